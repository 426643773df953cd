"""A run's output folder: one writer at a time (a lock), a checkpoint that resumes, and the "finished" rule.

Long runs append one JSON line per finished unit of work to a checkpoint whose first line records the run's
configuration; `--resume` refuses a checkpoint from a different configuration and says what differs. A run is
finished when its checkpoint is gone: removing it is the last write. `drive` is the one resume loop every command
shares: a method yields units of finished work, each is checkpointed as it comes, and the method's result returns.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from .files import atomic_write, current_umask, is_our_temporary, to_jsonable


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
# A finished run that --resume reopens, to write again what it writes from its finished parts: `run` rewrites its report
# from its finished stages (after an upgrade, or a stage redone by hand). Any other finished run is refused.
REWRITTEN_ON_RESUME = {"run": "its report from its finished stages"}


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
             parse: Callable[[dict], Any] | None = None) -> tuple[Path, Checkpoint, list]:
    """Prepare `out` for a run whose result is `name`.json: refuse a finished run or another command's, check the
    folder is writable, take its lock (one writer per folder), open the checkpoint `name`.checkpoint.jsonl and return
    the units already finished (when resuming), each through `parse` (which raises on a malformed unit). A finished
    run of REWRITTEN_ON_RESUME is reopened by --resume, to write its outputs again."""
    out = Path(out)
    if out.is_dir():
        _check_claimable(out, name, what, resume)  # before anything is written to the folder
    check_output_folder(out)
    lock_folder(out)
    try:  # again, now that no one else can write: another process may have finished it in between
        _check_claimable(out, name, what, resume)
        remove_stale_temporaries(out)
        checkpoint = Checkpoint(checkpoint_path(out, name), record)
        units = checkpoint.start(resume)
        return out, checkpoint, units if parse is None else [checkpoint.parse_unit(parse, unit, line)
                                                             for line, unit in enumerate(units, 2)]
    except BaseException:
        release_lock(out)
        raise


def _check_claimable(out: Path, name: str, what: str, resume: bool) -> None:
    rewrite = REWRITTEN_ON_RESUME.get(name)
    if rewrite is None or not is_finished(out, name):
        check_unclaimed(out, name, what)
        return
    check_not_foreign(out, name)
    if not resume:
        raise UserError(f"'{out}' holds {what} ({result_path(out, name).name}); add --resume to rewrite {rewrite}, or "
                        "choose another --out")


def check_unclaimed(out: Path, name: str, what: str) -> None:
    check_not_foreign(out, name)
    if is_finished(out, name):
        raise UserError(f"'{out}' already holds {what} ({result_path(out, name).name}); choose another --out")
    check_only_ours(out, name)


def check_only_ours(out: Path, name: str) -> None:
    """A command writes only into a folder that is new, empty, or holds its own unfinished run (its checkpoint):
    anything else may hold the user's files, which a run would overwrite (a figure's name) or mix with its own."""
    if not out.is_dir() or checkpoint_path(out, name).exists():
        return
    others = sorted(path.name for path in out.iterdir() if path.name != LOCK_NAME and not is_our_temporary(path))
    if others:
        shown = ", ".join(repr(other) for other in others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(f"'{out}' is not empty ({shown}) and holds no unfinished {RESULT_NAMES[name]} run to resume; "
                        "choose a new or empty --out (safety-heads never writes among files it did not make)")


# One writer per folder: an exclusive flock on a file in it, which the OS releases when the process ends, however it
# ends. Locks are held per process: a process may open the same folder again (a run's stage, a test that resumes in
# process). The lock's whole life is run_job's: taken by open_run, and its file removed when the run ends, however it
# ends (`release_lock`); a kill leaves the file behind, unlocked, for the next writer.
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
    """A kill during an atomic write leaves its temporary file (files.TEMPORARY_SUFFIX); the folder's new writer
    removes those, and only those: a user's own hidden .tmp file is not ours to delete."""
    for path in out.iterdir():
        if is_our_temporary(path):
            path.unlink(missing_ok=True)


class Checkpoint:
    """An append-only JSON-lines file: a header with the run's configuration, then one line per finished unit.

    What a kill or a full disk can leave is resumed: a last line without its newline (torn mid-write) is dropped, and
    a file without a whole header (torn between its creation and the header's write, before atomic headers) holds no
    work and starts afresh. Anything else that cannot be read (a hand edit, NaN or Infinity, a foreign file) is
    refused in one line naming the line, and the file is left as it was."""

    def __init__(self, path: str | Path, config: dict):
        self.path = Path(path)
        self.config = to_jsonable(config)
        self._intact: int | None = None  # bytes to keep before the next append (a torn last line is cut then)

    def start(self, resume: bool) -> list[dict]:
        """Open the checkpoint; returns the units already finished (empty unless resuming)."""
        records, intact = self._read() if self.path.exists() else ([], 0)
        if not records:  # no checkpoint, or one holding no whole line: nothing was finished, start afresh
            self._write_header()
            return []
        header, *units = records
        if not (isinstance(header, dict) and isinstance(header.get("config"), dict)):
            raise UserError(f"line 1 of {self.path} is unreadable (not a checkpoint header); remove {self.path.name} "
                            "to start afresh")
        if not resume:
            raise UserError(
                f"'{self.path.parent}' holds an unfinished run; add --resume to continue it, or choose another --out"
            )
        differences = describe_differences(header["config"], self.config)
        if differences:
            raise UserError(f"cannot resume: the checkpoint in '{self.path.parent}' was made with {differences}")
        self._intact = intact
        return units

    def _write_header(self) -> None:
        """Atomically: a kill or a full disk leaves no checkpoint or a whole header, never a torn one."""
        line = json.dumps({"config": self.config}, allow_nan=False) + "\n"
        atomic_write(self.path, lambda stream: stream.write(line.encode()))
        self._intact = None

    def _read(self) -> tuple[list, int]:
        """The whole lines, each checked, and how many bytes they span (a torn last line is not counted)."""
        data = self.path.read_bytes()
        *lines, _torn = data.split(b"\n")
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(strict_json(line))
            except ValueError as error:
                what = "unreadable (not a checkpoint header)" if number == 1 else f"not a checkpoint line ({error})"
                raise UserError(f"line {number} of {self.path} is {what}; remove that line and the ones after it "
                                f"(or {self.path.name}, to start afresh) and --resume") from None
        return records, sum(len(line) + 1 for line in lines)

    def parse_unit(self, parse: Callable[[dict], Any], unit: dict, line: int) -> Any:
        """`parse(unit)`, with a hand-edited or foreign line reported in one line instead of a traceback."""
        try:
            if not isinstance(unit, dict):
                raise TypeError(f"a JSON {type(unit).__name__}, not an object")
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
        if self._intact is not None:  # the first write after a resume: cut a torn last line, so new lines start cleanly
            with open(self.path, "r+b") as stream:
                stream.truncate(self._intact)
            self._intact = None
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    def remove(self) -> None:
        """The last write of a run: it is finished now (`is_finished`), and its folder free for others."""
        self.path.unlink(missing_ok=True)
        release_lock(self.path.parent)


def strict_json(line: bytes) -> Any:
    """A JSON value as our runs write it: UTF-8, no NaN or Infinity (json.dumps(allow_nan=False) wrote it), no number
    too large for a float; anything else raises ValueError."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not a number a run writes")

    def finite(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"{text[:20]} is too large")
        return value

    try:
        return json.loads(line.decode("utf-8"), parse_constant=refuse, parse_float=finite)
    except (UnicodeDecodeError, RecursionError) as error:
        raise ValueError(type(error).__name__) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error.msg}") from None


def describe_differences(old: dict, new: dict) -> str:
    """'epsilon=1e-05 (now 0.0001), template=raw (now paper)' for the keys whose values differ."""
    keys = sorted(set(old) | set(new))
    changed = [f"{key}={old.get(key)!r} (now {new.get(key)!r})" for key in keys if old.get(key) != new.get(key)]
    return ", ".join(changed)


def run_job(job, out: str | Path | None, name: str, what: str, *, resume: bool, parse: Callable[[dict], Any],
            encode: Callable[[Any], dict], write_outputs: Callable[[Any, Path], None]):
    """The one resume loop: with no `out`, the job's result; else open `out` (checked, locked, its checkpoint read back
    through `parse` when resuming), checkpoint each unit the job yields (`encode`d), write the outputs and remove the
    checkpoint, the last write; the folder's lock is released however the run ends. Every command's run goes
    through here."""
    from ..work import drain, finish

    if out is None:
        return finish(job)
    folder, checkpoint, units = open_run(out, name, what, job.record, resume, parse=parse)
    try:
        result = drain(job.run(units), lambda unit: checkpoint.append(encode(unit)))
        write_outputs(result, folder)
        checkpoint.remove()
    finally:
        release_lock(folder)
    return result
