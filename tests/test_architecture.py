"""The layering docs/architecture.md describes, checked on the source: methods compute and import neither the report
nor the runs layer; nothing below the command line imports it or `run`; modules and functions stay small."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "safety_heads"
METHODS = ("ships", "sahara", "guard", "evaluate", "estimate", "refusal", "measures", "subspace")
TOP = ("cli", "experiment")  # the command line and `safety-heads run`, which chains every stage


def imported(path: Path) -> set[str]:
    """The safety_heads modules `path` imports, as dotted names relative to the package ("runs.files", "cli")."""
    module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if "." in module else ""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
            target = ".".join([*[part for part in base if part], *([node.module] if node.module else [])])
            names |= {f"{target}.{alias.name}".strip(".") for alias in node.names} | {target}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safety_heads"):
            names.add(node.module.removeprefix("safety_heads").strip("."))
    return {name for name in names if name}


def sources():
    return sorted(path for path in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("name", METHODS)
def test_methods_import_neither_the_report_nor_the_runs_layer(name):
    for target in imported(PACKAGE / f"{name}.py"):
        assert not target.startswith(("runs", "report", *TOP)), f"{name}.py imports {target}"


def test_nothing_below_the_command_line_imports_it():
    for path in sources():
        if path.relative_to(PACKAGE).parts[0] in (*TOP, "cli.py", "experiment.py"):
            continue  # the command line's own modules, and `run`, which the command line calls
        for target in imported(path):
            assert target.split(".")[0] not in TOP, f"{path.relative_to(PACKAGE)} imports {target}"


def test_modules_and_functions_are_small():
    """450 lines a module and 60 a function, everywhere in the package (demo/ included)."""
    for path in sources():
        text = path.read_text()
        assert text.count("\n") <= 450, f"{path.relative_to(PACKAGE)} has {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.relative_to(PACKAGE)}: {node.name} has {length} lines"


def test_signatures_are_short():
    """At most 8 parameters a function (self and cls not counted), everywhere in the package: a longer list is a
    sign that values belong together (the in-trace ablation dict, a chunk, RunRecords)."""
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + [p.arg for p in (a.vararg, a.kwarg) if p]
                count = len([name for name in names if name not in ("self", "cls")])
                assert count <= 8, f"{path.relative_to(PACKAGE)}: {node.name} takes {count} parameters"


# Where JSON or .pt content is parsed, and why there: a file the project wrote is read back only by its one reader
# (runs/files.read_record, behind read_ships, read_sahara, read_evaluation and read_experiment); the checkpoint's own
# lines (runs/folder.py); the users' prompt files (data.py); NDIF's answers (remote.py).
PARSERS = {"runs/files.py", "runs/folder.py", "data.py", "remote.py"}


def test_nothing_parses_a_result_file_except_its_reader():
    for path in sources():
        name = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                if called.split(".")[-1] in ("loads", "load", "read_json", "load_tensors") and name not in PARSERS:
                    raise AssertionError(f"{name} parses a file itself ({called}): read it with its reader")


def test_configs_are_checked_where_they_are_made():
    """Every config dataclass validates itself when made (checked.Checked, or its own __post_init__), so no caller
    calls validate(): a config in hand is a checked one. The demo's training recipe (demo/) is no user's config."""
    for path in sources():
        name = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and not name.startswith("demo/"):
                bases = [ast.unparse(base) for base in node.bases]
                own = any(isinstance(item, ast.FunctionDef) and item.name == "__post_init__" for item in node.body)
                assert "Checked" in bases or own, f"{name}: {node.name} is not checked when made"
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(".validate") and name != "checked.py":
                raise AssertionError(f"{name} calls {ast.unparse(node.func)}(): configs are checked when made")


def test_the_ablation_setting_is_one_nested_value():
    """Kind, epsilon and the mean reference live in AblationConfig alone; every config that ablates nests one."""
    from dataclasses import fields

    from safety_heads.ablation import AblationConfig
    from safety_heads.evaluate import EvaluateConfig
    from safety_heads.experiment import ExperimentConfig
    from safety_heads.sahara import SaharaConfig
    from safety_heads.ships import ShipsConfig
    from safety_heads.surgery import SurgeryConfig

    own = {item.name for item in fields(AblationConfig)} | {"epsilon"}
    for config in (ShipsConfig, SaharaConfig, EvaluateConfig, SurgeryConfig, ExperimentConfig):
        names = {item.name: item for item in fields(config)}
        assert not own & set(names), f"{config.__name__} repeats {sorted(own & set(names))}"
        default = names["ablation"].default_factory()
        assert isinstance(default, AblationConfig), config.__name__
