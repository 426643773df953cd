"""Prompts in, formatted prompts out: bundled data sets, user files (CSV / JSON / JSONL) and prompt templates.

`load_prompts` reads a bundled set by name (`BUNDLED`) or a user file and returns clean, non-empty strings.
`format_prompts` turns them into the exact text and token ids the model sees, under one of three templates:

- ``raw``:   the query itself (the paper's "direct" input, Fig. 9);
- ``paper``: ``PAPER_TEMPLATE`` = ``"## Query: {query}\\n## Answer:"`` (App. B.1, Fig. 10);
- ``chat``:  the tokenizer's own chat template, optionally with a system prompt (App. D).

The original code spells the paper template four ways (reference/paper.md §6.7), so its Ships scores and its ablated
generations can be computed on different strings for the same query:

- ``"## Query:{q}\\n## Answer:"``   (Sahara);
- ``"## Query:{q} \\n## Answer:"``  (``SHIPS.main`` with ``use_tem``, and ``load_conv``);
- ``"## Query: {q}\\n## Answer:"``  (``SHIPS.ships_test`` with ``use_tem``; the one we use);
- the raw query (``use_tem=False``, the default in ``SHIPS.main``).

    safety-heads ships --model tiny --dataset maliciousinstruct --limit 4 --template paper --out runs/ships
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserError, first_line


@dataclass(frozen=True)
class BundledDataset:
    """A prompt set shipped in safety_heads/datasets/ (sources and commits in its README.md)."""

    file: str
    column: str  # CSV column or JSON field that holds the prompt
    description: str
    licence: str
    keep_if: tuple[str, str] | None = None  # keep only rows whose column (first) has this value (second)


_ALPACA = "CC BY-NC 4.0 (Alpaca instructions; non-commercial)"
_HARMLESS = "Alpaca instructions (harmless)"
_SPLITS = "refusal_direction's harmful split"
BUNDLED: dict[str, BundledDataset] = {
    # The paper's three evaluation sets, exactly as in its repository.
    "maliciousinstruct": BundledDataset(
        "maliciousinstruct.csv", "input", "MaliciousInstruct, the paper's copy (100)", "none stated"
    ),
    "jailbreakbench": BundledDataset(
        "jailbreakbench.csv", "input", "JailbreakBench behaviours, the paper's copy (100)", "MIT (JBB-Behaviors)"
    ),
    "advbench": BundledDataset("advbench.csv", "input", "AdvBench, the paper's copy (520)", "MIT (llm-attacks)"),
    "advbench-behaviors": BundledDataset(
        "harmful_behaviors.csv", "goal", "AdvBench as llm-attacks published it, with targets (520)", "MIT (llm-attacks)"
    ),
    "harmbench": BundledDataset(
        "harmbench_behaviors.csv", "Behavior",
        "HarmBench's standard behaviours (200); the copyright and contextual ones are left out",
        "MIT (HarmBench)", keep_if=("FunctionalCategory", "standard"),
    ),
    "harmful-train": BundledDataset("harmful_train.json", "instruction", f"{_SPLITS}, train (260)", "Apache-2.0"),
    "harmful-val": BundledDataset("harmful_val.json", "instruction", f"{_SPLITS}, val (39)", "Apache-2.0"),
    "harmful-test": BundledDataset("harmful_test.json", "instruction", f"{_SPLITS}, test (572)", "Apache-2.0"),
    "harmless-train": BundledDataset("harmless_train.json", "instruction", f"{_HARMLESS}, train (18793)", _ALPACA),
    "harmless-val": BundledDataset("harmless_val.json", "instruction", f"{_HARMLESS}, val (6264)", _ALPACA),
    "harmless-test": BundledDataset("harmless_test.json", "instruction", f"{_HARMLESS}, test (6266)", _ALPACA),
}

# A slice of a data set, 1-based and inclusive as the docs write them: "maliciousinstruct:51-100" (prompts 51 to 100),
# "maliciousinstruct:17-" (17 to the end). It works wherever a data set is named, lists included.
SLICE = re.compile(r"^(?P<name>.+):(?P<first>\d+)-(?P<last>\d*)$")

# Tried in this order (case-insensitively) when no column is given; an earlier name wins.
DEFAULT_COLUMNS = ("prompt", "query", "input", "instruction", "goal", "Behavior")
SUFFIXES = (".csv", ".json", ".jsonl")
MAX_FILE_BYTES = 256 * 2**20  # prompt files are read whole; far beyond any prompt set (HarmBench's is 0.2 MB)
_JSON_TYPES = {
    type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"
}


def load_prompts(source: str, column: str | None = None, limit: int | None = None, dedupe: bool = False,
                 offset: int = 0) -> list[str]:
    """The prompts of a bundled set or a .csv/.json/.jsonl file, stripped, in file order; `limit` of them from the
    0-based position `offset` (the first if not given)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if offset < 0:
        raise UserError(f"a data set's offset must be at least 0, got {offset}")
    source = str(source)  # a pathlib.Path works too
    sliced = slice_match(source)
    if sliced:
        prompts = _slice(load_prompts(sliced["name"], column, dedupe=dedupe), source, int(sliced["first"]), sliced["last"])
        return _offset(prompts, source, offset)[:limit]
    if source in BUNDLED:
        bundled = BUNDLED[source]
        data = resources.files("safety_heads").joinpath("datasets", bundled.file).read_bytes()
        records, columns = _parse(data, Path(bundled.file).suffix, f"data set '{source}'")
        if bundled.keep_if:
            key, value = bundled.keep_if
            records = [(label, row) for label, row in records if row.get(key) == value]
        prompts = _prompts(records, columns, column or bundled.column, f"data set '{source}'")
    else:
        path = Path(source).expanduser()
        where = f"'{source}'"
        if not path.exists():
            if path.suffix.lower() in SUFFIXES or "/" in source or "\\" in source:
                raise UserError(f"file '{source}' does not exist")
            raise UserError(
                f"unknown data set '{source}'; bundled: {', '.join(BUNDLED)} (or give a .csv, .json or .jsonl file)"
            )
        if path.is_dir():
            raise UserError(f"'{source}' is a folder; give a .csv, .json or .jsonl file")
        if not path.is_file():  # a FIFO would block the read forever, a device would never end
            raise UserError(f"'{source}' is not a regular file (a pipe or a device?); give a .csv, .json or .jsonl file")
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"'{source}' has an unsupported extension; use a .csv, .json or .jsonl file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UserError(f"'{source}' is {path.stat().st_size / 2**20:.0f} MB, over the {MAX_FILE_BYTES // 2**20} MB a prompt "
                            "file may hold; split it or keep the prompts you need")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UserError(f"could not read '{source}': {error.strerror}") from None
        records, columns = _parse(data, path.suffix.lower(), where)
        prompts = _prompts(records, columns, column, where)
    if dedupe:
        prompts = list(dict.fromkeys(prompts))  # keeps the first copy, in order
    return _offset(prompts, source, offset)[:limit]


def slice_match(source: str) -> re.Match | None:
    """A "NAME:A-B" slice name's parts, or None for a bundled set, an existing file (a file may be named so) or a
    plain name."""
    return SLICE.match(source) if source not in BUNDLED and not Path(source).expanduser().exists() else None


def _offset(prompts: list[str], source: str, offset: int) -> list[str]:
    if offset and offset >= len(prompts):
        raise UserError(f"{source} has {len(prompts)} prompts; none is left after skipping the first {offset}")
    return prompts[offset:]


def _slice(prompts: list[str], source: str, first: int, last: str) -> list[str]:
    """Prompts first..last (1-based, inclusive; to the end when last is empty) of a data set, checked."""
    stop = int(last) if last else len(prompts)
    if first < 1 or stop < first:
        raise UserError(f"'{source}': a slice is FIRST-LAST with 1 <= FIRST <= LAST (1-based, inclusive), e.g. :51-100")
    if stop > len(prompts):
        raise UserError(f"'{source}': the data set has {len(prompts)} prompts, so the slice cannot end at {stop}")
    return prompts[first - 1 : stop]


def find_duplicates(prompts: Iterable[str]) -> int:
    """How many prompts repeat an earlier one (0 when all are distinct), so callers can warn."""
    prompts = list(prompts)
    return len(prompts) - len(set(prompts))


# A record is (label for error messages, a string or a dict of fields); columns are the fields an object may use.
Record = tuple[str, object]


def _parse(data: bytes, suffix: str, where: str) -> tuple[list[Record], list[str]]:
    try:
        text = data.decode("utf-8-sig")  # -sig: spreadsheets often save a byte-order mark, which is not a column name
    except UnicodeDecodeError as error:
        raise UserError(f"{where} is not UTF-8 text (bad byte at offset {error.start}); save it as UTF-8") from None
    if suffix == ".csv":
        return _parse_csv(text, where)
    if suffix == ".json":
        try:
            items = json.loads(text, object_pairs_hook=_unique_keys)
        except _RepeatedKey as error:
            raise UserError(f"{where} repeats the key {error.args[0]!r} in one object; keep one, so it is clear which "
                            "holds the prompt") from None
        except json.JSONDecodeError as error:
            at = f"line {error.lineno} column {error.colno}"
            raise UserError(f"{where} is not valid JSON: {error.msg} at {at}") from None
        except (ValueError, RecursionError) as error:  # e.g. an integer with more digits than Python allows
            raise UserError(f"{where} is not valid JSON: {first_line(error)}") from None
        if isinstance(items, dict):  # {"prompts": [...]}: the one list-valued key holds them
            lists = [key for key, value in items.items() if isinstance(value, list)]
            if len(lists) != 1:
                raise UserError(f"{where} must hold a list of prompts, or an object with exactly one list-valued key")
            items = items[lists[0]]
        if not isinstance(items, list):
            raise UserError(f"{where} must hold a list of prompts, not {_JSON_TYPES.get(type(items), 'a value')}")
        return _with_columns([(f"item {i}", item) for i, item in enumerate(items, 1)])
    records = []  # .jsonl; split on \n only: JSON strings may hold U+2028 and other characters splitlines() breaks on
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append((f"line {number}", json.loads(line, object_pairs_hook=_unique_keys)))
            except _RepeatedKey as error:
                raise UserError(f"{where} line {number} repeats the key {error.args[0]!r}; keep one, so it is clear "
                                "which holds the prompt") from None
            except (ValueError, RecursionError):
                message = f"{where} line {number} is not valid JSON; each line must be one string or object"
                raise UserError(message) from None
    return _with_columns(records)


class _RepeatedKey(Exception):
    """A JSON object names a key twice; json.loads would keep the last silently."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _RepeatedKey(next(key for key in keys if keys.count(key) > 1))
    return dict(pairs)


def _with_columns(records: list[Record]) -> tuple[list[Record], list[str]]:
    # JSON objects pick their field from the keys of the first object; every other object must have it too.
    first = next((item for _, item in records if isinstance(item, dict)), {})
    return records, list(first)


def _parse_csv(text: str, where: str) -> tuple[list[Record], list[str]]:
    # newline="": quoted fields keep their own line breaks. strict: an unclosed quote is an error, not a field that
    # silently swallows the rest of the file. The field limit is the file's own limit (csv's default, 128 KB, would
    # refuse one long prompt with an error about quotes).
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, records, line = None, [], 1
    limit = csv.field_size_limit(MAX_FILE_BYTES)
    try:
        for row in reader:
            start, line = line, reader.line_num + 1  # a quoted field may span lines: name the line a row starts on
            if not row:  # a blank line; csv.DictReader skips these too
                continue
            if header is None:
                header = _checked_header(row, where)
            else:
                records.append((f"row {len(records) + 1} (line {start})", dict(zip(header, row))))
    except csv.Error as error:
        hint = " (check the quotes)" if "quot" in str(error) or "expected" in str(error) or "end of data" in str(error) else ""
        raise UserError(f"{where} is not valid CSV at line {reader.line_num}: {error}{hint}") from None
    finally:
        csv.field_size_limit(limit)
    return records, header or []


def _checked_header(header: list[str], where: str) -> list[str]:
    """A header naming a column twice would make a row's dict keep the last one silently."""
    seen: dict[str, int] = {}
    for position, name in enumerate(header, 1):
        if name.strip() and name in seen:
            raise UserError(f"{where} names the column {name!r} twice in its header (columns {seen[name]} and "
                            f"{position}); rename one, so it is clear which holds the prompts")
        seen.setdefault(name, position)
    return header


def _prompts(records: list[Record], columns: list[str], column: str | None, where: str) -> list[str]:
    key = _pick_column(columns, column, where) if any(isinstance(item, dict) for _, item in records) else None
    prompts = []
    for label, item in records:
        if isinstance(item, dict):
            if key not in item:
                has = ", ".join(map(repr, item)) or "nothing"
                raise UserError(f"{where} {label} has no {key!r} (it has: {has})")
            item = item[key]
        if not isinstance(item, str):
            raise UserError(f"{where} {label}: the prompt is {_JSON_TYPES.get(type(item), 'not text')}, not text")
        if not item.strip():
            raise UserError(f"{where} {label}: the prompt is empty")
        prompts.append(check_text(item.strip(), f"{where} {label}"))
    if not prompts:
        raise UserError(f"{where} holds no prompts")
    return prompts


def _pick_column(columns: list[str], column: str | None, where: str) -> str:
    available = ", ".join(repr(c) for c in columns) or "none"
    if column is not None:
        if column not in columns:
            raise UserError(f"{where} has no column {column!r}; available: {available}")
        return column
    for name in DEFAULT_COLUMNS:
        matches = [candidate for candidate in columns if candidate.lower() == name.lower()]
        if len(matches) > 1:
            raise UserError(f"{where}: columns {' and '.join(map(repr, matches))} both look like the prompts; pass "
                            "--column to choose one")
        if matches:
            return matches[0]
    if len(columns) == 1:
        return columns[0]
    raise UserError(f"{where}: which column holds the prompts? none is named {'/'.join(DEFAULT_COLUMNS)}; "
                    f"pass --column, one of: {available}")


# ----------------------------------------------------------------------------------------------------------------
# Templates.

# "auto" (every command's default) is the model's own chat template when its tokenizer has one, else raw: a chat
# model read a raw prompt answers differently (on the demo model the safety head ranked eighth instead of second).
TEMPLATES = ("auto", "raw", "paper", "chat")
PAPER_TEMPLATE = "## Query: {query}\n## Answer:"


@dataclass(frozen=True)
class FormattedPrompt:
    """A query, the text the model reads for it, and that text's token ids (special tokens included)."""

    query: str
    text: str
    token_ids: tuple[int, ...]


def check_text(text: str, where: str) -> str:
    """`text`, if a tokenizer can encode it: a lone surrogate (invalid UTF-8 on the command line, or a JSON escape
    such as \\ud800) cannot be."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(f"{where} is not valid text: character {error.start + 1} is a lone surrogate (invalid UTF-8 "
                        "bytes, or a JSON escape such as \\ud800); fix or remove it") from None
    return text


def resolve_template(template: str, tokenizer) -> str:
    """The template "auto" stands for with this tokenizer (chat if it has a chat template, else raw); others as given."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    return template


def format_prompt(query: str, template: str, tokenizer, system: str | None = None) -> FormattedPrompt:
    """Apply one template to one query and tokenize it exactly as the model will see it."""
    template = resolve_template(template, tokenizer)
    _check_template(template, tokenizer, system)
    check_text(query, "a prompt")
    if system is not None:
        check_text(system, "--system")
    if template == "chat":
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": query})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - a template may reject a system role (Gemma); the user can fix that
            raise UserError(f"the chat template of {_name(tokenizer)} failed: {first_line(error)}") from None
        # The chat template already writes BOS; encoding with special tokens would add a second one, which changes
        # what the model sees (and its refusals).
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        text = query if template == "raw" else PAPER_TEMPLATE.format(query=query)
        ids = tokenizer(text).input_ids  # the tokenizer's defaults: BOS where the model expects it
    return FormattedPrompt(query=query, text=text, token_ids=tuple(ids))


def format_prompts(
    queries: Iterable[str], template: str, tokenizer, system: str | None = None
) -> list[FormattedPrompt]:
    """`format_prompt` for each query, in order."""
    _check_template(resolve_template(template, tokenizer), tokenizer, system)  # fail before the first query, even for an empty list
    return [format_prompt(query, template, tokenizer, system) for query in queries]


def _check_template(template: str, tokenizer, system: str | None) -> None:
    if template not in TEMPLATES:
        raise UserError(f"unknown template '{template}'; choose {', '.join(TEMPLATES)}")
    if system is not None and template != "chat":
        raise UserError("--system only applies to --template chat")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {_name(tokenizer)} has no chat template; use --template raw or paper")


def _name(tokenizer) -> str:
    return f"'{tokenizer.name_or_path}'" if getattr(tokenizer, "name_or_path", "") else "this model"


def prompt_tokens(source: str, limit: int | None, template: str, tokenizer, system: str | None = None) -> list[list[int]]:
    """Token ids of a data set's first `limit` prompts under a template: e.g. the reference batch for mean ablation."""
    return [list(p.token_ids) for p in format_prompts(load_prompts(source, limit=limit), template, tokenizer, system)]
