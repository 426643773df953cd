"""One execution path: a local engine runs the request body NDIF runs (intrace.request_results), and the runner is
the one place that knows what differs between here and a remote host. Also scripts/ndif-local's input checks (the
server itself is exercised by tests/test_ndif.py, `-m ndif`)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from safety_heads import intrace
from safety_heads.engine import Engine, EngineConfig
from safety_heads.models import wrap
from safety_heads.tiny import byte_tokenizer, tiny_llama

SCRIPT = Path(__file__).parent.parent / "scripts" / "ndif-local"


def tiny_engine(config: EngineConfig | None = None) -> Engine:
    return Engine(wrap(tiny_llama(), byte_tokenizer(), "tiny"), config)


def test_a_local_engine_runs_the_request_body_ndif_runs(monkeypatch):
    engine = tiny_engine()
    bodies = []
    original = intrace.request_results

    def spy(lm, sites, request, save=None):
        bodies.append(request)
        yield from original(lm, sites, request, save)

    monkeypatch.setattr(intrace, "request_results", spy)
    sets = [[(0, 1)], [(1, 0), (1, 2)], []]
    result = engine.run(["How do I pick a lock?", "Hi"], sets, readouts=("logits", "hidden"))
    assert len(bodies) == 1  # the whole call is one request here: results stream back pass by pass
    assert result.logits.shape[:2] == (2, 3) and torch.isfinite(result.logits).all()
    monkeypatch.undo()
    assert torch.equal(engine.run(["How do I pick a lock?", "Hi"], sets).logits, result.logits)


def test_results_stream_here_and_come_whole_from_a_request(monkeypatch):
    here = tiny_engine()
    simulated = tiny_engine(EngineConfig(remote="local"))
    assert here.runner.result_budget() == (math.inf, None) and not here.runner.fewest_calls
    assert simulated.runner.result_budget() == (256 * 2**20, None) and simulated.runner.fewest_calls
    a = here.run(["How do I pick a lock?"], [[(0, 1)], [(1, 3)]], readouts=("logits", "hidden"))
    b = simulated.run(["How do I pick a lock?"], [[(0, 1)], [(1, 3)]], readouts=("logits", "hidden"))
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-6)
    assert a.stats["traces"] == b.stats["traces"] and a.stats["flops"] == b.stats["flops"]  # one place counts both


def script(*arguments: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NDIF_LOCAL_DIR": str(tmp_path / "state"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True, env=env, timeout=120)


def test_ndif_local_refuses_bad_input_in_one_line_and_starts_nothing(tmp_path):
    usage = script(tmp_path=tmp_path)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: scripts/ndif-local up")
    missing = script("up", "--model", str(tmp_path / "nowhere"), tmp_path=tmp_path)
    assert missing.returncode == 2 and "is not a model folder" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()  # nothing installed, nothing started
    unknown = script("up", "--port", "1", tmp_path=tmp_path)
    assert unknown.returncode == 2 and "unknown argument '--port'" in unknown.stderr
    status = script("status", tmp_path=tmp_path)
    assert status.returncode == 1 and "not set up" in status.stdout
    assert script("down", tmp_path=tmp_path).returncode == 0  # nothing to stop is not an error
