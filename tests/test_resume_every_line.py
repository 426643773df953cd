"""Resume is exact: a run killed after any checkpoint line, then resumed, gives the uninterrupted run's JSON.

The kill is simulated deterministically: `Checkpoint.append` writes its line (fsynced, as always) and then raises
`Killed`, a BaseException that nothing in the program catches, so nothing after that instant runs, as with SIGKILL.
Each resumed process is killed again after its first new line, so the chain resumes once from every checkpoint
length 1, 2, ..., N (every line is a kill point), and the last resume finishes. Every line each resume wrote must equal,
byte for byte, the line of an uninterrupted run, and the finished JSON files must be equal in every number.
"""

import json
from pathlib import Path

import pytest

import safety_heads.runs.folder as folder
from safety_heads.cli import main


class Killed(BaseException):
    """SIGKILL at one instant: the line just appended stays; nothing after it runs."""


# Guarded Sahara (the guard's batches widen 1, 2, 4, ...: their state must continue across a resume) and the whole
# study, whose stages each resume on their own. Small settings on the built-in demo model.
COMMANDS = {
    "sahara": ["sahara", "--dataset", "maliciousinstruct", "--limit", "3", "--steps", "2", "--guard", "harmless-val",
               "--guard-limit", "4", "--guard-tokens", "6", "--guard-batch", "1", "--guard-max-rise", "0.05"],
    "run": ["run", "--quick", "--limit", "2", "--max-new-tokens", "6", "--steps", "2"],
}
RESULTS = {"sahara": ["sahara.json"],
           "run": ["experiment.json", "ships/ships.json", "sahara/sahara.json", "eval/eval.json", "eval-per-query/eval.json"]}
VARIES = ("compute", "timings_seconds")  # this process's seconds and FLOPs: a resume computes only what was left


def checkpoint_lines(monkeypatch, out: Path, kill_after: int | None) -> dict[str, list[str]]:
    """Every line appended to any checkpoint under `out`, by path; with `kill_after`, Killed after that many appends."""
    lines: dict[str, list[str]] = {}
    append = folder.Checkpoint.append

    def recording_append(self, unit):
        append(self, unit)
        lines.setdefault(str(self.path.relative_to(out)), []).append(self.path.read_text().splitlines()[-1])
        if kill_after is not None and sum(map(len, lines.values())) == kill_after:
            raise Killed

    monkeypatch.setattr(folder.Checkpoint, "append", recording_append)
    return lines


def comparable(path: Path, out: Path) -> dict:
    """The result without what may vary, and with its own folder's name (recorded sources) made neutral."""
    record = json.loads(path.read_text().replace(json.dumps(str(out))[1:-1], "OUT"))
    return {key: value for key, value in record.items() if key not in VARIES}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_killed_after_every_checkpoint_line_resumes_to_the_uninterrupted_json(name, tmp_path, monkeypatch, capsys):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    with monkeypatch.context() as patch:
        uninterrupted = checkpoint_lines(patch, reference, None)
        assert main([*COMMANDS[name], "--out", str(reference)]) == 0
    total = sum(map(len, uninterrupted.values()))
    if name == "sahara":  # the guard failed a head and widened its batch: the state a resume must continue
        checks = [json.loads(line)["guard"] for line in uninterrupted["sahara.checkpoint.jsonl"] if '"guard"' in line]
        assert any(len(check) > 1 for check in checks), checks
    assert total >= 6  # enough lines that the chain crosses layers, guard checks (and, for run, stages)
    resumed: dict[str, list[str]] = {}
    for kill in range(total):
        with monkeypatch.context() as patch:
            lines = checkpoint_lines(patch, killed, 1)
            with pytest.raises(Killed):
                main([*COMMANDS[name], "--out", str(killed)] + (["--resume"] if kill else []))
        for file, new in lines.items():
            resumed.setdefault(file, []).extend(new)
        folder.release_locks()  # the OS would release a killed process's lock
    assert main([*COMMANDS[name], "--out", str(killed), "--resume"]) == 0
    capsys.readouterr()
    assert resumed == uninterrupted  # each line, computed after a resume from every length, byte for byte
    for result in RESULTS[name]:
        assert comparable(killed / result, killed) == comparable(reference / result, reference), result
    assert not list(killed.rglob("*.checkpoint.jsonl"))
