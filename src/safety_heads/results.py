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
from typing import Any, Callable

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


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a folder; choose a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as error:
        raise UserError(f"cannot write to output folder '{out}': {error.strerror or error}") from None
    return out


# The results each command writes, by the name of its final JSON: a folder holds one command's run.
RESULT_NAMES = {"ships": "Ships", "sahara": "Sahara", "eval": "evaluation", "run": "study (safety-heads run)",
                "surgery": "surgery"}
LOCK_NAME = ".safety-heads.lock"


def checkpoint_path(out: Path, name: str) -> Path:
    return out / f"{name}.checkpoint.jsonl"


def result_path(out: Path, name: str) -> Path:
    return out / ("experiment.json" if name == "run" else f"{name}.json")


def is_finished(out: str | Path, name: str) -> bool:
    """A run is finished when its checkpoint is gone: removing it is the last write of finalisation, after every
    output has been written (atomically). A folder with a checkpoint and some outputs is a run killed while it was
    finishing, which `--resume` completes."""
    out = Path(out)
    return result_path(out, name).exists() and not checkpoint_path(out, name).exists()


def check_not_foreign(out: Path, name: str) -> None:
    """Refuse a folder that holds another command's run: resuming into it would mix two runs' files."""
    for other, title in RESULT_NAMES.items():
        if other != name and (result_path(out, other).exists() or checkpoint_path(out, other).exists()):
            raise UserError(f"'{out}' holds a {title} run, not a {RESULT_NAMES[name]} one; choose another --out")


def open_run(out: str | Path, name: str, what: str, record: dict, resume: bool,
             parse: Callable[[dict], Any] | None = None) -> tuple[Path, "Checkpoint", list]:
    """Prepare `out` for a run whose result is `name`.json: refuse a finished run or another command's, check the
    folder is writable, take its lock (one writer per folder), open the checkpoint `name`.checkpoint.jsonl and return
    the units already finished (when resuming), each through `parse` (which raises on a malformed unit)."""
    out = Path(out)
    if out.is_dir():
        _check_unclaimed(out, name, what)  # before anything is written to the folder
    check_output_folder(out)
    lock_folder(out)
    try:  # again, now that no one else can write: another process may have finished it in between
        _check_unclaimed(out, name, what)
    except UserError:
        release_lock(out)
        raise
    remove_stale_temporaries(out)
    checkpoint = Checkpoint(checkpoint_path(out, name), record)
    units = checkpoint.start(resume)
    return out, checkpoint, units if parse is None else [checkpoint.parse_unit(parse, unit, line) for line, unit in enumerate(units, 2)]


def _check_unclaimed(out: Path, name: str, what: str) -> None:
    check_not_foreign(out, name)
    if is_finished(out, name):
        raise UserError(f"'{out}' already holds {what} ({result_path(out, name).name}); choose another --out")


# One writer per folder: an exclusive flock on a file in it, which the OS releases when the process ends, however it
# ends. Locks are held per process: a process may open the same folder again (a run's stage, a test that resumes in
# process). The lock file is removed when the run finishes (`release_lock`) or the command returns (`release_locks`);
# a kill leaves it behind, unlocked, for the next writer.
_held_locks: dict[Path, int] = {}


def lock_folder(out: Path) -> None:
    import fcntl

    key = out.resolve()
    while key not in _held_locks:
        handle = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(handle)
            raise UserError(f"'{out}' is in use by another safety-heads process; wait for it to finish, or choose another --out") from None
        try:
            same = os.stat(key / LOCK_NAME).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _held_locks[key] = handle
        else:  # the holder removed the file between our open and our lock: that lock guards nothing, take a new one
            os.close(handle)


def release_lock(out: Path) -> None:
    handle = _held_locks.pop(Path(out).resolve(), None)
    if handle is not None:
        Path(out, LOCK_NAME).unlink(missing_ok=True)  # while still held, so no one locks the file we remove
        os.close(handle)


def release_locks() -> None:
    for folder in list(_held_locks):
        release_lock(folder)


def remove_stale_temporaries(out: Path) -> None:
    """A kill during an atomic write leaves its temporary file (.NAME.XXXX.tmp); the folder's new writer removes them."""
    for path in out.glob(".*.tmp"):
        path.unlink(missing_ok=True)


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

    def parse_unit(self, parse: Callable[[dict], Any], unit: dict, line: int) -> Any:
        """`parse(unit)`, with a hand-edited or foreign line reported in one line instead of a traceback."""
        try:
            return parse(unit)
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - any malformed content (missing key, wrong shape, wrong type)
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:120]
            raise UserError(f"line {line} of {self.path} is malformed ({reason}); remove that line, or the file to start "
                            "afresh, and --resume") from None

    def append(self, unit: dict) -> None:
        self._append(unit)

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    def remove(self) -> None:
        """The last write of a run: it is finished now (`is_finished`), and its folder free for others."""
        self.path.unlink(missing_ok=True)
        release_lock(self.path.parent)


def describe_differences(old: dict, new: dict) -> str:
    """'epsilon=1e-05 (now 0.0001), template=raw (now paper)' for the keys whose values differ."""
    keys = sorted(set(old) | set(new))
    changed = [f"{key}={old.get(key)!r} (now {new.get(key)!r})" for key in keys if old.get(key) != new.get(key)]
    return ", ".join(changed)
