"""Nothing lost, nothing leaked: real processes killed with SIGKILL and SIGINT, then resumed; secrets never written.

The kill tests start the real command line in a subprocess, wait until its checkpoint holds a given number of
finished units, kill it, resume in-process with --resume, and compare with an uninterrupted run. docs/reliability.md
quotes the counts these tests enumerate (KILL_POINTS).
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

QUERIES = [f"Question number {i}: how would someone do thing {i}?" for i in range(8)]
FAKE_SECRETS = {"HF_TOKEN": "hf_FAKEplantedTOKEN1234567890", "NDIF_API_KEY": "ndif-FAKE-planted-key-0987654321"}

# command name -> (arguments after the subcommand, checkpoint file, finished-unit counts at which a run is killed)
KILL_POINTS = {
    "ships": (["--max-batch-rows", "2"], "ships.checkpoint.jsonl", (1, 5)),
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


def start(argv):
    # One torch thread, as in this test process (conftest), so both sides compute bit-identical numbers.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "safety_heads.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


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


def result_without_timing(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("name, units", [(name, units) for name, (_, _, points) in KILL_POINTS.items() for units in points])
def test_sigkill_then_resume_equals_uninterrupted(name, units, dataset, tmp_path, capsys):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(command(name, dataset, reference)) == 0
    checkpoint = killed / KILL_POINTS[name][1]
    process = start(command(name, dataset, killed))
    wait_for_units(process, checkpoint, units)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = len(checkpoint.read_text().splitlines()) - 1
    assert kept >= units
    assert main(command(name, dataset, killed) + ["--resume"]) == 0
    capsys.readouterr()
    final = {"ships": "ships.json", "evaluate": "eval.json", "sahara": "sahara.json", "run": "experiment.json"}[name]
    a, b = result_without_timing(reference / final), result_without_timing(killed / final)
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
    assert not checkpoint.exists()


@pytest.mark.parametrize("name", list(KILL_POINTS))
def test_ctrl_c_stops_cleanly_in_one_line_and_resumes(name, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    checkpoint = out / KILL_POINTS[name][1]
    process = start(command(name, dataset, out))
    wait_for_units(process, checkpoint, 1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("safety-heads: interrupted") and "Traceback" not in stderr
    assert main(command(name, dataset, out) + ["--resume"]) == 0


def test_changed_configuration_is_refused_on_resume(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    process = start(command("ships", dataset, out))
    wait_for_units(process, out / "ships.checkpoint.jsonl", 1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    capsys.readouterr()
    assert main(command("ships", dataset, out) + ["--resume", "--epsilon", "1e-5", "--template", "paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume" in err and "epsilon=0.0001 (now 1e-05)" in err and "template='raw' (now 'paper')" in err


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
    import safety_heads.models as models
    from ndif_mock import MockNdif, tiny_pair

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
