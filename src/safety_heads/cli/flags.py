"""Command-line flags generated from the config dataclasses, so that a default lives in one place: the field.

    flags = Flags(ships_parser, "ships")          # the parser's `configs`: (ShipsConfig, EngineConfig, ModelConfig)
    flags.add("top_k", "heads recomputed exactly by estimate+verify (default %(default)s)")

`add` names a field of the first of the command's configs that has it. A config nested in another (AblationConfig, in
every config that ablates) is one of the command's configs too, and its flags fill the nested value. The flag is the
field's name with dashes (`flag=` for the few exceptions, such as --memory-budget for memory_budget_mb); its type and default come from the
field (int, float, str and their Optional; a bool is a switch: --name when it defaults to False, --no-name when it
defaults to True); its help is written beside the call, where `%(default)s` is argparse's own substitution, so no help
repeats a default. Flags that set no config field (--out, --resume, --show) go through `plain`, an add_argument.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, Field


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it (or there is none to say)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or "default" in text.lower()  # nargs 0: a switch
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default {action.default})".strip()


def one_line(message: str) -> str:
    """An error message is one line, even when it quotes a path or a prompt holding a newline, and safe for a terminal
    (a prompt's ESC sequence or bidi override is escaped: progress.terminal_safe)."""
    from ..progress import terminal_safe

    message = terminal_safe(message)
    if len(message) > 2000:  # a data file's 10 MB column name quoted in full would bury the message
        message = f"{message[:1200]} [... {len(message) - 1800} characters ...] {message[-600:]}"
    return message


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit code 2), like every other error; --help shows defaults.
    A command's parser also knows the config dataclasses its flags fill (`configs`, first match wins) and which of
    their fields have a flag (`config_fields`, as (class name, field name) pairs; tests/test_cli.py checks that every
    other field is excluded on purpose)."""

    def __init__(self, *args, configs: Sequence[type] = (), **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)
        self.configs = tuple(configs)
        self.config_fields: set[tuple[str, str]] = set()

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def field_default(field: Field):
    """A dataclass field's default, read when the parser is built (a test changes one and sees the flag follow)."""
    return field.default_factory() if field.default is MISSING and field.default_factory is not MISSING else field.default


def _value_type(annotation):
    """The argparse type of a field: bool (a switch), int, float, or None (the string as given). `bool | str` is a
    string with a bare-flag constant (--remote); `X | None` is X."""
    if typing.get_origin(annotation) is typing.Literal:
        members = {type(value) for value in typing.get_args(annotation)}
    elif isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = set(typing.get_args(annotation)) - {type(None)}
    else:
        members = {annotation}
    if str in members:
        return None
    if len(members) == 1 and next(iter(members)) in (bool, int, float):
        return next(iter(members))
    raise TypeError(f"no command-line type for the annotation {annotation!r}")


def _annotation(cls: type, name: str):
    """A field's annotation, evaluated; one that names a type only imported for type checkers is read as text."""
    annotation = cls.__dataclass_fields__[name].type
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, vars(sys.modules[cls.__module__]))  # noqa: S307 - the config's own source
    except NameError:
        names = {"bool": bool, "int": int, "float": float, "str": str, "None": type(None)}
        members = [names.get(part.strip(), object) for part in annotation.split("|")]
        return members[0] if len(members) == 1 else typing.Union[tuple(members)]  # noqa: UP007 (built at run time)


def config_default(parser: _Parser, name: str, config: type | None = None):
    """The default of field `name` of `config` (else of the first of the parser's configs that has the field)."""
    cls = _config_of(parser, name, config)
    return field_default(cls.__dataclass_fields__[name])


def _config_of(parser: _Parser, name: str, config: type | None) -> type:
    cls = config or next((c for c in parser.configs if name in c.__dataclass_fields__), None)
    if cls is None:
        raise KeyError(f"{parser.prog}: no config of this command has a field '{name}'")
    return cls


class Flags:
    """One argument group of a command's parser (the parser itself with no title), adding flags from its configs."""

    def __init__(self, parser: _Parser, title: str | None = None):
        self.parser = parser
        self.group = parser if title is None else parser.add_argument_group(title)

    def add(self, name: str, help: str, *, config: type | None = None, flag: str | None = None, **kwargs):
        """The flag that sets field `name` of `config` (default: the first of the parser's configs that has one)."""
        cls = _config_of(self.parser, name, config)
        default = field_default(cls.__dataclass_fields__[name])
        kind = _value_type(_annotation(cls, name))
        kwargs.setdefault("dest", name)
        dashed = name.replace("_", "-")
        if kind is bool:
            flag = flag or (f"--no-{dashed}" if default else f"--{dashed}")
            kwargs.setdefault("action", "store_false" if default else "store_true")
        else:
            flag = flag or f"--{dashed}"
            kwargs.setdefault("type", kind)
        if not kwargs.get("required"):
            kwargs.setdefault("default", default)  # a command whose config nests `cls` with other defaults says so
        self.parser.config_fields.add((cls.__name__, name))
        for parent in self.parser.configs:  # a config that nests `cls` (ShipsConfig.ablation) is filled by its flags
            self.parser.config_fields |= {(parent.__name__, item.name) for item in parent.__dataclass_fields__.values()
                                          if isinstance(field_default(item), cls)}
        return self.group.add_argument(flag, help=help, **kwargs)

    def add_all(self, helps: dict[str, str]) -> None:
        """`add` for each (field name, help) of a table, in its order (the order of --help)."""
        for name, text in helps.items():
            self.add(name, text)

    def plain(self, *names: str, **kwargs):
        """A flag that sets no config field: argparse's add_argument as it is."""
        return self.group.add_argument(*names, **kwargs)


def folder(value: str) -> str:
    """An --out value: a folder name, not an empty string (which would write into the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty; name an output folder")
    return value


def none_word(value: str) -> str | None:
    """A value where the word 'none' (any case) means None: --guard none."""
    return None if value.lower() == "none" else value


def values_may_start_with_minus(argv: Sequence[str]) -> list[str]:
    """`--heads -1:0` as `--heads=-1:0`: argparse takes a value that starts with '-' for an option, and would answer
    "expected one argument" instead of checking the value (here: a layer that does not exist)."""
    argv, joined, index = list(argv), [], 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--") and "=" not in token and index + 1 < len(argv) and re.match(r"^-\d", argv[index + 1]):
            joined.append(f"{token}={argv[index + 1]}")
            index += 2
        else:
            joined.append(token)
            index += 1
    return joined
