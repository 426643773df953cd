"""Result files: atomic writes, JSON records, and the notebook-style .pt files.

Every file is written to a temporary name and renamed into place, so a killed run never leaves a half-written
result. Results are JSON (and `.pt` files holding only tensors, lists, dicts and strings, so `torch.load(...,
weights_only=True)` reads them); nothing is ever unpickled from an untrusted file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Our temporary files end in this, a name no user would choose: a folder's next writer removes only these, never
# another hidden ".tmp" file that may be the user's.
TEMPORARY_SUFFIX = ".safety-heads.tmp"


def is_our_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX) and path.is_file()


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes 0600; results are ordinary files
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, record: Any) -> None:
    text = json.dumps(to_jsonable(record), indent=1, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda stream: stream.write(text.encode()))


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read result file '{path}': {error}") from None


# The result files safety-heads writes, by their "format" field, each with the one reader that parses it back into
# its typed result (runs/ships.py read_ships, runs/sahara.py read_sahara, runs/evaluate.py read_evaluation).
FILE_NAMES = {"safety-heads/ships": "ships.json", "safety-heads/sahara": "sahara.json", "safety-heads/eval": "eval.json",
              "safety-heads/experiment": "experiment.json"}
LAYOUT_ERRORS = (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError)


def read_record(path: str | Path, parsers: dict[str, Callable[[dict], Any]]) -> Any:
    """A result file of one of the formats `parsers` names, parsed into its typed result by that format's parser: the
    one way a file safety-heads wrote is read back. A missing, unreadable, foreign or hand-broken file is one line
    naming it."""
    record = read_json(path)
    kind = record.get("format") if isinstance(record, dict) else None
    if kind not in parsers:
        names = " or ".join(FILE_NAMES[name] for name in parsers)
        raise UserError(f"'{path}' is not a {names} from safety-heads (format: {kind!r})")
    try:
        return parsers[kind](record)
    except UserError:
        raise
    except LAYOUT_ERRORS as error:
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:160]
        raise UserError(f"'{path}' does not follow the {kind} layout ({reason})") from None


def save_tensors(path: str | Path, record: dict) -> None:
    """A .pt file for users of the original notebooks; only tensors, numbers, strings, lists and dicts."""
    record = to_jsonable(record, keep_tensors=True)  # TorchVersion, tuples, dataclasses -> plain types
    atomic_write(Path(path), lambda stream: torch.save(record, stream))


def load_tensors(path: str | Path) -> dict:
    return torch.load(path, weights_only=True)  # never unpickle arbitrary objects


def to_jsonable(value: Any, keep_tensors: bool = False) -> Any:
    """Dataclasses, tuples and tensors to plain JSON; NaN (a head not scored) to null. With `keep_tensors`, tensors
    stay tensors (for .pt files) and everything else becomes plain types that weights_only loading accepts."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value), keep_tensors)
    if isinstance(value, dict):
        return {str(key): to_jsonable(item, keep_tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, keep_tensors) for item in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu() if keep_tensors else to_jsonable(value.tolist())
    if isinstance(value, str):
        return str(value)  # also turns str subclasses (torch's TorchVersion) into plain strings
    if isinstance(value, float) and value != value and not keep_tensors:
        return None
    return value


def matrix_or_nan(rows: list[list[float | None]]) -> torch.Tensor:
    """A layers x heads list of lists with nulls back into a float64 tensor with NaN."""
    return torch.tensor([[float("nan") if x is None else x for x in row] for row in rows], dtype=torch.float64)


def notebook_header(format_name: str, version: int, config: dict) -> dict:
    """The first keys of a notebook-style .pt file: its format, version and the run's configuration (without the
    head layout, which the notebooks do not read)."""
    return {"format": format_name, "version": version, "config": {k: v for k, v in config.items() if k != "layout"}}
