"""Nothing lost, nothing leaked: real processes killed with SIGKILL and SIGINT, then resumed; secrets never written.

The kill tests run the real command line in a subprocess that sends itself the signal right after its checkpoint's
given number of finished units is on disk (SELF_SIGNAL): the signal lands at that point of the run every time, never
racing the run's end, as a signal sent from outside at a moment would. Then they resume in-process with --resume and
compare with an uninterrupted run. docs/reliability.md quotes the counts these tests enumerate (KILL_POINTS).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safety_heads.cli import main
from safety_heads.runs.files import TEMPORARY_SUFFIX

QUERIES = [f"Question number {i}: how would someone do thing {i}?" for i in range(8)]
FAKE_SECRETS = {"HF_TOKEN": "hf_FAKEplantedTOKEN1234567890", "NDIF_API_KEY": "ndif-FAKE-planted-key-0987654321"}

# command name -> (arguments after the subcommand, checkpoint file, finished-unit counts at which a run is killed)
KILL_POINTS = {
    "ships": (["--max-batch-rows", "2", "--queries-per-pass", "1"], "ships.checkpoint.jsonl", (1, 5)),
    "evaluate": (["--heads", "0:1,2:3", "--max-new-tokens", "6", "--batch-size", "2", "--harmless", ""], "eval.checkpoint.jsonl", (2,)),
    "sahara": (["--steps", "2", "--max-batch-rows", "8"], "sahara.checkpoint.jsonl", (3,)),
    # the whole study, killed in the middle of its Sahara stage
    "run": (["--ships-limit", "2", "--sahara-dataset", "{dataset}", "--sahara-limit", "6", "--eval-limit", "2", "--harmless-limit", "2",
             "--max-new-tokens", "4", "--steps", "2", "--max-batch-rows", "8"], "sahara/sahara.checkpoint.jsonl", (2,)),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "queries.json"
    path.write_text(json.dumps(QUERIES))
    return path


def command(name, dataset, out):
    arguments, _, _ = KILL_POINTS[name]
    arguments = [a.format(dataset=dataset) for a in arguments]
    if name == "run":
        return [name, "--quick", "--out", str(out), *arguments]
    return [name, "--dataset", str(dataset), "--out", str(out), *arguments]


def wait_for_units(process, checkpoint: Path, units: int, timeout: float = 120.0) -> None:
    """Until the checkpoint has a header plus `units` finished lines (or the process ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if checkpoint.exists() and len(checkpoint.read_text().splitlines()) >= 1 + units:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {units} units: {process.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the checkpoint")


# The command line, sending itself signal SIGNUM right after the UNITS-th line of the checkpoint at PATH is written.
SELF_SIGNAL = """
import os, sys
from pathlib import Path
import safety_heads.runs.folder as folder
from safety_heads.cli import main
path, units, signum = Path(sys.argv[1]).resolve(), int(sys.argv[2]), int(sys.argv[3])
append, written = folder.Checkpoint.append, []
def append_then_signal(self, unit):
    append(self, unit)
    if self.path.resolve() == path:
        written.append(unit)
        if len(written) == units:
            os.kill(os.getpid(), signum)
folder.Checkpoint.append = append_then_signal
sys.exit(main(sys.argv[4:]))
"""


def signalled(argv, checkpoint: Path, units: int, signum: int) -> subprocess.CompletedProcess:
    """The real command line in a subprocess, signalled by itself right after `units` finished lines of `checkpoint`.
    One torch thread, as in this test process (conftest), so both sides compute bit-identical numbers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", SELF_SIGNAL, str(checkpoint), str(units), str(int(signum)), *argv],
                          capture_output=True, text=True, env=env, timeout=600)


def result_without_timing(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("name, units", [(name, units) for name, (_, _, points) in KILL_POINTS.items() for units in points])
def test_sigkill_then_resume_equals_uninterrupted(name, units, dataset, tmp_path, capsys):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(command(name, dataset, reference)) == 0
    checkpoint = killed / KILL_POINTS[name][1]
    process = signalled(command(name, dataset, killed), checkpoint, units, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert len(checkpoint.read_text().splitlines()) - 1 == units  # killed right there: the rest is left to resume
    assert main(command(name, dataset, killed) + ["--resume"]) == 0
    capsys.readouterr()
    assert_same_result(name, reference, killed)
    assert not checkpoint.exists()


FINAL = {"ships": "ships.json", "evaluate": "eval.json", "sahara": "sahara.json", "run": "experiment.json"}


def assert_same_result(name: str, reference: Path, killed: Path) -> None:
    """The results of an interrupted-then-resumed run equal an uninterrupted one's."""
    a, b = result_without_timing(reference / FINAL[name]), result_without_timing(killed / FINAL[name])
    if name == "ships":
        assert a["queries"] == b["queries"] and a["aggregate"] == b["aggregate"]
        assert [q["index"] for q in b["queries"]] == list(range(len(QUERIES)))  # none missing, none twice
    elif name == "sahara":
        assert a["heads"] == b["heads"] and a["steps"] == b["steps"]
    elif name == "run":
        assert a["heads"] == b["heads"] and a["asr"] == b["asr"] and a["harmless"] == b["harmless"]
        for stage in ("sahara/sahara.json", "eval/eval.json", "eval-per-query/eval.json"):
            first, second = result_without_timing(reference / stage), result_without_timing(killed / stage)
            assert first.get("steps", first.get("samples")) == second.get("steps", second.get("samples"))
    else:
        assert a["samples"] == b["samples"] and a["results"] == b["results"]


@pytest.mark.parametrize("name", list(KILL_POINTS))
def test_ctrl_c_stops_cleanly_in_one_line_and_resumes(name, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    checkpoint = out / KILL_POINTS[name][1]
    process = signalled(command(name, dataset, out), checkpoint, 1, signal.SIGINT)
    stderr = process.stderr
    assert process.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("safety-heads: interrupted") and "Traceback" not in stderr
    assert main(command(name, dataset, out) + ["--resume"]) == 0


def test_sigterm_stops_a_real_run_in_one_line_and_resumes(dataset, tmp_path, capsys):
    """SIGTERM (a `kill`, a scheduler's limit) is answered like Ctrl-C: one line, status 143, then --resume."""
    out = tmp_path / "run"
    process = signalled(command("ships", dataset, out), out / "ships.checkpoint.jsonl", 1, signal.SIGTERM)
    stderr = process.stderr
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("safety-heads: terminated (SIGTERM)") and "Traceback" not in stderr
    assert main(command("ships", dataset, out) + ["--resume"]) == 0


def test_changed_configuration_is_refused_on_resume(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    process = signalled(command("ships", dataset, out), out / "ships.checkpoint.jsonl", 1, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, process.stderr
    capsys.readouterr()
    assert main(command("ships", dataset, out) + ["--resume", "--epsilon", "1e-5", "--template", "paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume" in err and "epsilon=0.0001 (now 1e-05)" in err
    assert "template='chat' (now 'paper')" in err  # the template used: auto was chat here


def assert_no_secrets(folder: Path, printed, min_files: int) -> None:
    """No planted secret in any file under `folder`, nor in what was printed."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) >= min_files
    for path in files:
        data = path.read_bytes()
        for secret in FAKE_SECRETS.values():
            assert secret.encode() not in data, path
    for secret in FAKE_SECRETS.values():
        assert secret not in printed.out and secret not in printed.err


def test_secrets_never_reach_any_output(dataset, tmp_path, monkeypatch, capsys):
    for key, value in FAKE_SECRETS.items():
        monkeypatch.setenv(key, value)
    assert main(["ships", "--dataset", str(dataset), "--limit", "2", "--out", str(tmp_path / "ships")]) == 0
    assert main(["evaluate", "--dataset", str(dataset), "--limit", "2", "--heads", "0:1", "--max-new-tokens", "4",
                 "--harmless-limit", "2", "--out", str(tmp_path / "eval")]) == 0
    assert main(["surgery", "--heads", "0:1", "--out", str(tmp_path / "surgery")]) == 0
    assert_no_secrets(tmp_path, capsys.readouterr(), min_files=10)


def test_documented_counts_match_the_tests():
    import re

    import test_cli

    text = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    kills = sum(len(points) for _, _, points in KILL_POINTS.values())
    assert f"SIGKILL at **{kills}** points" in text
    assert f"**{len(KILL_POINTS)}** commands" in text
    bad = [row for row in test_cli.BAD if row[1]]  # one row is a must-succeed control
    assert f"Each of **{len(bad)}** bad command lines" in text
    assert re.search(r"head-spec parser with 200 random specs", text)


def test_secrets_never_reach_any_output_of_a_remote_run(dataset, tmp_path, monkeypatch, capsys):
    """The same scan over a --remote run against the loopback mock of NDIF (tests/ndif_mock.py): the key travels in
    the request headers, and nowhere else."""
    from ndif_mock import MockNdif, tiny_pair

    import safety_heads.models as models

    client, server = tiny_pair()
    monkeypatch.setattr(models, "load_remote_model", lambda config: client)  # the hub lookup, stubbed
    for key, value in FAKE_SECRETS.items():
        monkeypatch.setenv(key, value)
    with MockNdif(server.lm, failures={"post": ["503"], "poll": ["drop"]}, api_key=FAKE_SECRETS["NDIF_API_KEY"]) as mock:
        remote = ["--model", "org/tiny", "--remote", mock.url, "--trust-remote-host", "--remote-backoff", "0.001"]
        assert main(["ships", "--dataset", str(dataset), "--limit", "2", "--out", str(tmp_path / "ships"), *remote]) == 0
        assert main(["evaluate", "--dataset", str(dataset), "--limit", "2", "--heads", "0:1", "--max-new-tokens", "4",
                     "--harmless-limit", "2", "--out", str(tmp_path / "eval"), *remote]) == 0
        assert main(["doctor", "--trust-remote-host", "--host", mock.url, "--model", "org/tiny"]) == 0
        assert mock.executed >= 4 and set(mock.keys_seen) == {FAKE_SECRETS["NDIF_API_KEY"]}
    assert_no_secrets(tmp_path, capsys.readouterr(), min_files=5)


# -- finishing: a kill or a full disk at any write of finalisation, then --resume -----------------------------------


class Killed(BaseException):
    """Stands for SIGKILL at one instant: what was written stays, nothing after it runs (not even except: blocks that
    catch Exception)."""


def finalisation_events(monkeypatch, fail_at: int | None, failure) -> list[str]:
    """Count the writes of finalisation (every atomic file write, and each checkpoint's removal, the last step), and
    make the `fail_at`-th fail with `failure(path)`. A failing atomic write first leaves its temporary file behind,
    as a kill in the middle of it would."""
    import safety_heads.report as report
    import safety_heads.runs.figures as figures
    import safety_heads.runs.files as results
    import safety_heads.runs.folder as folder

    events: list[str] = []
    write, remove = results.atomic_write, folder.Checkpoint.remove

    def event(path: Path) -> None:
        events.append(path.name)
        if len(events) - 1 == fail_at:
            raise failure(path)

    def atomic_write(path, writer):
        path = Path(path)
        if len(events) == fail_at:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / f".{path.name}.killed{TEMPORARY_SUFFIX}").write_bytes(b"half")
        event(path)
        write(path, writer)

    def remove_checkpoint(self):
        event(self.path)
        remove(self)

    monkeypatch.setattr(results, "atomic_write", atomic_write)
    monkeypatch.setattr(report, "atomic_write", atomic_write)
    monkeypatch.setattr(figures, "atomic_write", atomic_write)
    monkeypatch.setattr(folder.Checkpoint, "remove", remove_checkpoint)
    return events


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def references(dataset, tmp_path_factory):
    """Each command's uninterrupted run, and how many finalisation events it had."""
    folders, counts = {}, {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in KILL_POINTS:
            events = finalisation_events(monkeypatch, None, None)
            folders[name] = tmp_path_factory.mktemp("reference") / name
            assert main(command(name, dataset, folders[name])) == 0
            counts[name] = len(events)
    return folders, counts


def kill_cases():
    # run: its 34 events are each stage's outputs and checkpoint (both searches and both evaluations), then the
    # figures, the report and the run's own files
    counts = {"ships": 4, "sahara": 5, "evaluate": 3, "run": 34}
    return [(name, index) for name, count in counts.items() for index in range(count)]


@pytest.mark.parametrize("name, index", kill_cases())
def test_killed_at_each_write_of_finalisation_then_resume_completes(name, index, dataset, references, tmp_path, monkeypatch, capsys):
    reference_folders, counts = references
    assert counts[name] == len([case for case in kill_cases() if case[0] == name])  # the cases cover every event
    out = tmp_path / "killed"
    with monkeypatch.context() as patch:
        events = finalisation_events(patch, index, lambda path: Killed(path))
        with pytest.raises(Killed):
            main(command(name, dataset, out))
        assert len(events) == index + 1
    assert main(command(name, dataset, out) + ["--resume"]) == 0
    capsys.readouterr()
    assert_same_result(name, reference_folders[name], out)
    assert files_under(out) == files_under(reference_folders[name])  # every output there, no temporary, no checkpoint


@pytest.mark.parametrize("name, index", [("ships", 0), ("ships", 2), ("sahara", 3), ("run", 9), ("run", 20)])
def test_full_disk_while_finishing_is_one_line_and_resumes(name, index, dataset, references, tmp_path, monkeypatch, capsys):
    import errno

    out = tmp_path / "full"
    with monkeypatch.context() as patch:
        finalisation_events(patch, index, lambda path: OSError(errno.ENOSPC, "No space left on device", str(path)))
        assert main(command(name, dataset, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or (len(err) > 1 and err[-1].startswith("safety-heads: error:")
                             and all(not line.startswith("safety-heads") for line in err[:-1]))
    assert "No space left on device" in err[-1] and "--resume" in err[-1] and "Traceback" not in "\n".join(err)
    assert main(command(name, dataset, out) + ["--resume"]) == 0
    assert_same_result(name, references[0][name], out)
    assert files_under(out) == files_under(references[0][name])


def test_full_disk_while_checkpointing_keeps_the_finished_units(dataset, references, tmp_path, monkeypatch, capsys):
    """A checkpoint line torn by a full disk is dropped on resume; the lines before it are kept."""
    import errno

    import safety_heads.runs.folder as results

    out, appended = tmp_path / "full", []
    original = results.Checkpoint._append

    def append(self, record):
        appended.append(record)
        if len(appended) == 2:  # one unit (the header is written atomically), then a half-written line: disk full
            with open(self.path, "a", encoding="utf-8") as stream:
                stream.write('{"index": 1, "que')
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        original(self, record)

    with monkeypatch.context() as patch:
        patch.setattr(results.Checkpoint, "_append", append)
        assert main(command("ships", dataset, out)) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert len((out / "ships.checkpoint.jsonl").read_text().splitlines()) == 3  # header, one unit, the torn line
    assert main(command("ships", dataset, out) + ["--resume"]) == 0
    assert_same_result("ships", references[0]["ships"], out)


# -- one run per folder ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("owner, intruder", [("ships", "sahara"), ("ships", "run"), ("sahara", "ships"), ("evaluate", "ships"),
                                              ("run", "ships")])
def test_resume_into_another_commands_folder_is_refused(owner, intruder, dataset, references, tmp_path, capsys):
    import shutil

    folder = tmp_path / "taken"
    shutil.copytree(references[0][owner], folder)
    before = {path: path.stat().st_mtime_ns for path in folder.rglob("*")}
    assert main(command(intruder, dataset, folder) + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a" in err[0] and "choose another --out" in err[0]
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*")} == before  # nothing written, nothing mixed in


def test_a_second_writer_is_refused_in_one_line(dataset, tmp_path, capsys):
    """The lock is an flock on a file in the folder: here held through another open file, as another process would."""
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    handle = os.open(out / ".safety-heads.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        assert main(command("ships", dataset, out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another safety-heads process" in err[0] and str(out) in err[0]
        assert sorted(p.name for p in out.iterdir()) == [".safety-heads.lock"]  # nothing written
    finally:
        os.close(handle)
    assert main(command("ships", dataset, out)) == 0  # free again: the run goes ahead, and leaves no lock behind
    assert ".safety-heads.lock" not in {p.name for p in out.iterdir()}


# The command line, holding its first finished unit until the file GO exists: it keeps its folder locked, unfinished,
# for as long as a test needs, so what another process meets meanwhile does not depend on timing.
HELD_BEFORE_THE_FIRST_UNIT = """
import sys, time
from pathlib import Path
import safety_heads.runs.folder as folder
from safety_heads.cli import main
go, append = Path(sys.argv[1]), folder.Checkpoint.append
def append_when_told(self, unit):
    while not go.exists():
        time.sleep(0.01)
    append(self, unit)
folder.Checkpoint.append = append_when_told
sys.exit(main(sys.argv[2:]))
"""


def test_two_processes_on_one_folder_one_is_refused(dataset, tmp_path):
    """Real processes: the second --resume on a folder that the first is still writing is refused; the first finishes
    unharmed. The first holds the lock from before its first checkpoint line until it ends, and is held before that
    line until the test lets it go, so the second meets it at work every time."""
    out, go = tmp_path / "shared", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", HELD_BEFORE_THE_FIRST_UNIT, str(go), *command("ships", dataset, out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_units(first, out / "ships.checkpoint.jsonl", 0)  # its header: the folder is locked and claimed
        second = subprocess.run([sys.executable, "-m", "safety_heads.cli", *command("ships", dataset, out), "--resume"],
                                capture_output=True, text=True, env=env)
    finally:
        go.touch()
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1 and "in use by another" in lines[0], second.stderr
    checkpoint_lines = json.loads((out / "ships.json").read_text())["queries"]
    assert [q["index"] for q in checkpoint_lines] == list(range(len(QUERIES)))


# -- malformed checkpoints -----------------------------------------------------------------------------------------


def interrupted_ships(dataset, out, monkeypatch) -> Path:
    """A ships run stopped after its first query (as Ctrl-C would): a checkpoint with its header and one unit."""
    import safety_heads.ships as ships

    def stop(line):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ships, "print_progress", stop)
        assert main(command("ships", dataset, out)) == 130
    return out / "ships.checkpoint.jsonl"


@pytest.mark.parametrize("edit, reason", [
    (lambda unit: unit.pop("query"), "KeyError"),
    (lambda unit: unit.update(index=5 + len(QUERIES)), "query index"),
    (lambda unit: unit.update(index="0"), "query index"),
    (lambda unit: unit.update(scores=[[0.0, 1.0]]), "shape"),
    (lambda unit: unit.update(scores="none"), "Error"),
    (lambda unit: unit.update(verified=[[1]]), "Error"),
])
def test_a_hand_edited_checkpoint_line_is_one_line(edit, reason, dataset, tmp_path, monkeypatch, capsys):
    checkpoint = interrupted_ships(dataset, tmp_path / "edited", monkeypatch)
    header, unit = checkpoint.read_text().splitlines()
    unit = json.loads(unit)
    edit(unit)
    checkpoint.write_text(header + "\n" + json.dumps(unit) + "\n")
    capsys.readouterr()
    assert main(command("ships", dataset, tmp_path / "edited") + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2 of" in err[0] and "is malformed" in err[0] and reason in err[0], err


@pytest.mark.parametrize("unit, reason", [
    ({"step": 9, "layer": 0, "group": [], "scores": [0.0] * 8}, "step 9"),
    ({"step": 1, "layer": 7, "group": [], "scores": [0.0] * 8}, "not in the model"),
    ({"step": 1, "layer": 0, "group": [], "scores": [0.0] * 3}, "3 scores"),
    ({"step": 1, "group": []}, "neither"),
])
def test_a_foreign_sahara_checkpoint_line_is_one_line(unit, reason, dataset, tmp_path, monkeypatch, capsys):
    import safety_heads.sahara as sahara

    out = tmp_path / "sahara"
    with monkeypatch.context() as patch:  # stopped after its first layer, as Ctrl-C would
        patch.setattr(sahara, "print_progress", lambda line: (_ for _ in ()).throw(KeyboardInterrupt()))
        assert main(command("sahara", dataset, out)) == 130
    checkpoint = out / "sahara.checkpoint.jsonl"
    header = checkpoint.read_text().splitlines()[0]
    checkpoint.write_text(header + "\n" + json.dumps(unit) + "\n")
    capsys.readouterr()
    assert main(command("sahara", dataset, out) + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is malformed" in err[0] and reason in err[0], err


def test_a_command_that_stops_early_frees_its_folder(tmp_path, monkeypatch):
    """A command that ends before its run finishes (here: interrupted after the folder is locked) releases the lock
    and removes the lock file when main() returns, so another process may resume at once."""
    from safety_heads.cli import main
    from safety_heads.runs import folder
    from safety_heads.ships import Ships

    def interrupted(self, items):
        assert (tmp_path / "out" / folder.LOCK_NAME).exists()  # the run holds its folder while it works
        raise KeyboardInterrupt

    monkeypatch.setattr(Ships, "score_many", interrupted)
    assert main(["ships", "--prompt", "How do I pick a lock?", "--out", str(tmp_path / "out")]) == 130
    assert not (tmp_path / "out" / folder.LOCK_NAME).exists()
    assert folder._held_locks == {}
