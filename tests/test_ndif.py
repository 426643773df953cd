"""Against NDIF's own server software, running on this machine (`scripts/ndif-local up`): every remote path equals
the same command run here, and failures end in a retry or one line and a folder `--resume` completes.

Deselected by default (they need the server, which `scripts/ndif-local up` installs from the package registry):

    scripts/ndif-local up && python -m pytest -q -m ndif tests/test_ndif.py; scripts/ndif-local down

NDIF_LOCAL_URL names another server (default http://127.0.0.1:8001). Without a server every test fails with one
message saying how to start it: they are never skipped silently.
"""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from safety_heads.cli import main

pytestmark = pytest.mark.ndif

URL = os.environ.get("NDIF_LOCAL_URL", "http://127.0.0.1:8001")
REMOTE = ["--remote", URL, "--trust-remote-host"]
ENV = {"NDIF_API_KEY": "local-test"}  # the local server checks no keys; the client insists on having one
RTOL = 1e-5


@pytest.fixture(scope="module")
def server():
    try:
        with urllib.request.urlopen(f"{URL}/status", timeout=10) as response:
            status = json.loads(response.read())
    except OSError as error:
        pytest.fail(f"no NDIF server at {URL} ({error}); start one with scripts/ndif-local up")
    return status


@pytest.fixture
def remote_env(monkeypatch, server):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    submissions = []
    from safety_heads.remote import NdifBackend

    submit = NdifBackend._submit

    def counted(self, blob):  # every request sent (a retried send counts once per attempt)
        submissions.append(len(blob))
        return submit(self, blob)

    monkeypatch.setattr(NdifBackend, "_submit", counted)
    return submissions


def run_both(arguments: list[str], tmp_path: Path, capsys) -> tuple[Path, Path]:
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main([*arguments, "--out", str(local)]) == 0
    assert main([*arguments, "--out", str(remote), *REMOTE]) == 0, capsys.readouterr().err
    return local, remote


def close(a, b) -> None:
    """Within RTOL of the largest value (scores near zero differ by round-off of the larger ones); the same missing
    entries (None, as JSON writes NaN) on both sides."""
    a, b = (torch.tensor(nan_for_none(x), dtype=torch.float64) for x in (a, b))
    assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
    a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    scale = max(a.abs().max().item(), 1e-12)
    assert torch.allclose(a, b, rtol=RTOL, atol=RTOL * scale), (a - b).abs().max().item() / scale


def same_up_to_round_off(a, b) -> None:
    """Equal JSON values, floats within RTOL."""
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-12), (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            same_up_to_round_off(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same_up_to_round_off(x, y)
    else:
        assert a == b


def nan_for_none(value):
    if isinstance(value, list):
        return [nan_for_none(item) for item in value]
    return float("nan") if value is None else value


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


# -- remote equals local --------------------------------------------------------------------------------------------

SHIPS = ["ships", "--model", "demo", "--dataset", "maliciousinstruct", "--limit", "4"]


def test_ships_remote_equals_local_one_request_per_query(remote_env, tmp_path, capsys):
    local, remote = run_both(SHIPS, tmp_path, capsys)
    a, b = read(local, "ships.json"), read(remote, "ships.json")
    assert [q["index"] for q in a["queries"]] == [q["index"] for q in b["queries"]] == [0, 1, 2, 3]
    for first, second in zip(a["queries"], b["queries"]):
        close(first["scores"], second["scores"])
    # docs/remote.md: one request per pass of --queries-per-pass queries (default 8) whose readouts fit the result budget
    assert len(remote_env) == 1


def test_sahara_remote_equals_local(remote_env, tmp_path, capsys):
    arguments = ["sahara", "--model", "demo", "--dataset", "maliciousinstruct", "--limit", "4", "--steps", "2"]
    local, remote = run_both(arguments, tmp_path, capsys)
    a, b = read(local, "sahara.json"), read(remote, "sahara.json")
    assert a["heads"] == b["heads"]
    assert len(a["steps"]) == len(b["steps"]) == 2
    for first, second in zip(a["steps"], b["steps"]):
        assert first["chosen"] == second["chosen"]
        close(first["score"], second["score"])
        close(first["scores"], second["scores"])
    assert len(remote_env) == 1 + 2  # docs/remote.md: the clean model's readouts, then a whole step per request


def test_evaluate_remote_equals_local(remote_env, tmp_path, capsys):
    arguments = ["evaluate", "--model", "demo", "--dataset", "maliciousinstruct", "--limit", "2", "--heads", "0:1,2:3",
                 "--harmless-limit", "2", "--max-new-tokens", "6"]
    local, remote = run_both(arguments, tmp_path, capsys)
    a, b = read(local, "eval.json"), read(remote, "eval.json")
    assert a["samples"] == b["samples"]  # the same greedy tokens, answers and verdicts
    assert a["results"] == b["results"]


def test_run_remote_equals_local(remote_env, tmp_path, capsys):
    arguments = ["run", "--model", "demo", "--quick", "--limit", "3", "--steps", "2", "--max-new-tokens", "6"]
    local, remote = run_both(arguments, tmp_path, capsys)
    a, b = read(local, "experiment.json"), read(remote, "experiment.json")
    assert a["heads"] == b["heads"] and a["asr"] == b["asr"]
    same_up_to_round_off(a["harmless"], b["harmless"])  # answers identical; its mean KL is a float of them
    for stage in ("sahara/sahara.json", "eval/eval.json", "eval-per-query/eval.json"):
        first, second = read(local, stage), read(remote, stage)
        assert first.get("samples") == second.get("samples")  # generations and verdicts
        assert [s["chosen"] for s in first.get("steps", [])] == [s["chosen"] for s in second.get("steps", [])]


def test_the_notebook_runs_remote_with_the_same_answers(tmp_path):
    """notebooks/demo.ipynb with SAFETY_HEADS_REMOTE set to the server: every step that runs on NDIF gives what it
    gives here (the same Sahara group, ASR and harmless lines; surgery, which needs the weights here, is skipped)."""
    from test_notebook import run_notebook

    (tmp_path / "local").mkdir(), (tmp_path / "remote").mkdir()
    local = run_notebook(tmp_path / "local").stdout.splitlines()
    remote = run_notebook(tmp_path / "remote", SAFETY_HEADS_REMOTE=URL, **ENV).stdout.splitlines()
    assert "surgery: skipped, the weights are not on this machine (REMOTE)" in remote

    def kept(lines):  # the lines of the Sahara, evaluation and flipped-answer cells
        # (not the printed angles, KL and NLL: the server's transformers rounds a little differently, 1e-5 relative)
        return [line for line in lines if line.startswith(("Sahara group:", "maliciousinstruct", "jailbreakbench",
                                                           "query:", "baseline:", "ablated:")) or "flipped" in line]

    assert kept(local) and kept(remote) == kept(local)


# -- failures ---------------------------------------------------------------------------------------------------------


# The client, SIGKILLed at a known instant: right after its first checkpoint line is on disk (no race with the run's
# end, as a kill sent from outside at a moment would have).
KILLED_AFTER_THE_FIRST_LINE = """
import os, signal, sys
import safety_heads.runs.folder as folder
from safety_heads.cli import main
append = folder.Checkpoint.append
def append_then_die(self, unit):
    append(self, unit)
    os.kill(os.getpid(), signal.SIGKILL)
folder.Checkpoint.append = append_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_the_client_is_killed_mid_sweep(remote_env, tmp_path, capsys):
    local, killed = tmp_path / "local", tmp_path / "killed"
    assert main([*SHIPS, "--out", str(local)]) == 0
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-c", KILLED_AFTER_THE_FIRST_LINE, *SHIPS, "--out", str(killed), *REMOTE],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert len((killed / "ships.checkpoint.jsonl").read_text().splitlines()) == 2  # the header and one query
    assert main([*SHIPS, "--out", str(killed), *REMOTE, "--resume"]) == 0
    a, b = read(local, "ships.json"), read(killed, "ships.json")
    assert [q["index"] for q in b["queries"]] == [0, 1, 2, 3]  # none lost, none twice
    for first, second in zip(a["queries"], b["queries"]):
        close(first["scores"], second["scores"])


def model_actor_pids() -> list[int]:
    """The Ray worker processes holding a deployed model (their process title names the actor class)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if "CPUModelDeployment" in line and "ray::" in line]


def test_a_killed_model_actor_ends_in_equal_results_or_one_line_and_resume(remote_env, tmp_path, capsys):
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main([*SHIPS, "--out", str(local)]) == 0
    pids = model_actor_pids()
    assert pids, "no model actor found (is the demo model deployed?)"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # Ray restarts it (max_restarts=-1); the next request meets the restart
    code = main([*SHIPS, "--out", str(remote), *REMOTE, "--remote-backoff", "5"])
    if code != 0:
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("safety-heads: error: ") and "--resume" in err[-1], err
        for _ in range(3):  # the actor comes back within seconds; each attempt waits on the server's own restart
            if main([*SHIPS, "--out", str(remote), *REMOTE, "--resume"]) == 0:
                break
        else:
            raise AssertionError(capsys.readouterr().err)
    a, b = read(local, "ships.json"), read(remote, "ships.json")
    assert [q["index"] for q in b["queries"]] == [0, 1, 2, 3]
    for first, second in zip(a["queries"], b["queries"]):
        close(first["scores"], second["scores"])


SCRIPT = Path(__file__).parent.parent / "scripts" / "ndif-local"


def restart(service: str) -> None:
    done = subprocess.run([str(SCRIPT), "restart", service], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("service", ["api", "redis"])
def test_a_service_restarted_under_a_request_ends_in_equal_results_or_one_line_and_resume(service, remote_env, tmp_path,
                                                                                           capsys, monkeypatch):
    """The first request is sent, then the API or Redis (the queue and the results) restarts before the client asks
    for the result: no timing involved, the restart happens between the two calls."""
    from safety_heads.remote import NdifBackend

    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main([*SHIPS, "--out", str(local)]) == 0
    submit, restarted = NdifBackend._submit, []

    def submit_then_restart(self, blob):
        submit(self, blob)
        if not restarted:
            restarted.append(service)
            restart(service)

    monkeypatch.setattr(NdifBackend, "_submit", submit_then_restart)
    try:
        code = main([*SHIPS, "--out", str(remote), *REMOTE, "--remote-backoff", "2"])
        assert restarted
        if code != 0:
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and err[-1].startswith("safety-heads: error: ") and "--resume" in err[-1], err
            if service == "redis":
                # ndif 0.1.2's API does not reconnect to a restarted Redis (it answers 503 "compute backend is
                # reconnecting" until it restarts itself): the operator's fix, then the user's --resume.
                restart("api")
            assert main([*SHIPS, "--out", str(remote), *REMOTE, "--resume"]) == 0, capsys.readouterr().err
    finally:
        if service == "redis":
            restart("api")  # leave a working server for the tests after this one
    a, b = read(local, "ships.json"), read(remote, "ships.json")
    assert [q["index"] for q in b["queries"]] == [0, 1, 2, 3]
    for first, second in zip(a["queries"], b["queries"]):
        close(first["scores"], second["scores"])


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("safety-heads: error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def test_a_model_the_server_does_not_serve_is_one_line(remote_env, tmp_path, capsys):
    from safety_heads.tiny import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "undeployed")  # a real folder no server has deployed
    from safety_heads.tiny import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "undeployed")
    line = one_line_error(["ships", "--model", str(tmp_path / "undeployed"), "--prompt", "How do I pick a lock?",
                           "--out", str(tmp_path / "out"), *REMOTE, "--remote-attempts", "1"], capsys)
    assert "request" in line


def test_a_server_that_is_down_is_one_line(remote_env, tmp_path, capsys):
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    line = one_line_error(["ships", "--model", "demo", "--prompt", "How do I pick a lock?", "--out", str(tmp_path / "out"),
                           "--remote", f"http://127.0.0.1:{port}", "--trust-remote-host", "--remote-attempts", "2",
                           "--remote-backoff", "0.01"], capsys)
    assert "request" in line
