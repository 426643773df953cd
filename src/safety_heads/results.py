"""Results on disk: atomic writes, versioned JSON records, checkpoints that resume, and the notebook-style .pt files.

Every file is written to a temporary name and renamed into place, so a killed run never leaves a half-written
result. Long runs append one JSON line per finished unit of work to a checkpoint whose first line records the run's
configuration; `--resume` refuses a checkpoint from a different configuration and says what differs.

Results are JSON (and `.pt` files holding only tensors, lists, dicts and strings, so `torch.load(...,
weights_only=True)` reads them); nothing is ever unpickled from an untrusted file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError


def versions() -> dict[str, str]:
    """Library versions that change numbers: recorded in every result."""
    import nnsight
    import transformers

    from . import __version__

    return {
        "safety_heads": __version__,
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only loading refuses
        "transformers": transformers.__version__,
        "nnsight": nnsight.__version__,
    }


def run_record(model, config, queries, source: dict) -> dict:
    """Everything that determines a run's numbers (model, dtype, every config field, the data); a resumed run must
    match it exactly. `config` is any dataclass; `queries` are hashed, not stored."""
    digest = hashlib.sha256("\n\x00".join(queries).encode()).hexdigest()
    settings = asdict(config)
    for item in fields(config):  # how work is batched changes no number: such fields say metadata={"recorded": False}
        if not item.metadata.get("recorded", True):
            settings.pop(item.name)
    return {
        "model": model.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config.attn_implementation,
        **settings,
        **source,
        "n_queries": len(queries),
        "queries_sha256": digest,
    }


def compute_record(flops: float, seconds: float) -> dict:
    """What a run's engine sweeps cost in this process: FLOPs (flops.py), the run's wall seconds, and the rate."""
    return {"engine_flops": flops, "seconds": seconds, "gflop_per_s": flops / seconds / 1e9 if seconds > 0 else None}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
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


def check_output_folder(out: str | Path) -> Path:
    """Fail early, in one line, if results cannot be written to `out` (a file in the way, no permission, ...)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as error:
        raise UserError(f"cannot write to output folder '{out}': {error.strerror or error}") from None
    return out


def open_run(out: str | Path, name: str, what: str, record: dict, resume: bool) -> tuple[Path, "Checkpoint", list[dict]]:
    """Prepare `out` for a run whose result is `name`.json: refuse a finished run, check the folder is writable, open
    the checkpoint `name`.checkpoint.jsonl and return the units already finished (when resuming)."""
    out = Path(out)
    if (out / f"{name}.json").exists():
        raise UserError(f"'{out}' already holds {what} ({name}.json); choose another --out")
    check_output_folder(out)
    checkpoint = Checkpoint(out / f"{name}.checkpoint.jsonl", record)
    return out, checkpoint, checkpoint.start(resume)


class Checkpoint:
    """An append-only JSON-lines file: a header with the run's configuration, then one line per finished unit."""

    def __init__(self, path: str | Path, config: dict):
        self.path = Path(path)
        self.config = to_jsonable(config)

    def start(self, resume: bool) -> list[dict]:
        """Open the checkpoint; returns the units already finished (empty unless resuming)."""
        if not self.path.exists():  # nothing to resume (or a fresh run): start afresh
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"config": self.config})
            return []
        if not resume:
            raise UserError(
                f"'{self.path.parent}' holds an unfinished run; add --resume to continue it, or choose another --out"
            )
        records, intact_bytes = self._read_intact()
        if not records or "config" not in records[0]:
            raise UserError(f"the checkpoint in '{self.path.parent}' is unreadable; remove {self.path.name} to start afresh")
        header, *units = records
        differences = describe_differences(header["config"], self.config)
        if differences:
            raise UserError(f"cannot resume: the checkpoint in '{self.path.parent}' was made with {differences}")
        with open(self.path, "r+b") as stream:
            stream.truncate(intact_bytes)  # drop a line torn by a kill mid-write, so new lines start cleanly
        return units

    def _read_intact(self) -> tuple[list[dict], int]:
        """The records up to the first torn or unreadable line, and how many bytes they span."""
        records, intact = [], 0
        with open(self.path, "rb") as stream:
            for line in stream:
                if not line.endswith(b"\n"):
                    break
                try:
                    records.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break
                intact += len(line)
        return records, intact

    def append(self, unit: dict) -> None:
        self._append(unit)

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def describe_differences(old: dict, new: dict) -> str:
    """'epsilon=1e-05 (now 0.0001), template=raw (now paper)' for the keys whose values differ."""
    keys = sorted(set(old) | set(new))
    changed = [f"{key}={old.get(key)!r} (now {new.get(key)!r})" for key in keys if old.get(key) != new.get(key)]
    return ", ".join(changed)
