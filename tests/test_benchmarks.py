"""The device check script (benchmarks/gpu_check.py) runs end to end on small shapes on the CPU, so it is ready for a
GPU session; its correctness stage holds here too."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_small_shapes(tmp_path):
    out = tmp_path / "gpu_check.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--small", "--naive-heads", "4", "--sahara-queries", "4",
         "--naive-sets", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=1800,  # a hang guard only: on a busy 2-core machine it took over 600 s
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["correctness_max_rel_error"] <= 1e-5
    assert report["ships_7b"]["max_rel_diff"] <= 1e-4 and report["sahara_7b"]["max_angle_diff"] <= 1e-3
    assert report["ships_7b"]["ratio"] > 0 and report["qwen_bf16"]["per_query"] > 0
    # the whole study ran as a user types it, on the saved checkpoint, and its stage times came back
    study = report["study_7b"]
    assert study["limit"] == 2 and {"ships", "sahara"} <= set(study["stages_s"]) and study["wall_s"] > 0


def test_head_truth_study_runs_on_the_demo_model(tmp_path):
    """Issue 22's study end to end on the demo model at toy sizes: the head set is fixed (and written) before any head
    is measured, every head of it is measured on both held-out sets, and the tables come out."""
    import json

    import torch

    scores = tmp_path / "scores.json"
    generator = torch.Generator().manual_seed(0)
    scores.write_text(json.dumps({"mean": {name: torch.rand(4, 8, generator=generator).tolist()
                                           for name in ("kl", "refusal-logprob", "refusal-direction")}}))
    out = tmp_path / "study"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "head_truth_study.py"), "--model", "demo", "--scores", str(scores),
         "--out", str(out), "--top", "2", "--random", "3", "--candidates", "4", "--max-new-tokens", "6",
         "--sahara-steps", "2", "--threads", "1"],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    fixed = json.loads((out / "truth-set.json").read_text())
    result = json.loads((out / "truth_study.json").read_text())
    chosen = {tuple(h) for heads in fixed["tops"].values() for h in heads} | {tuple(h) for h in fixed["random"]}
    measured = {tuple(int(x) for x in row["head"].split(":")) for row in result["truth"]["heads"]}
    assert measured == chosen and len(fixed["random"]) == 3
    for entry in result["truth"]["by_score"].values():
        assert 0 <= entry["precision_at_5"] <= 1
    groups = result["groups"]
    assert groups["clean"]["maliciousinstruct-51-100_rise"] == 0 and "refusal-search-k1" in groups
    assert groups["paper-sahara-k2"]["heads"].count(":") == 2  # the paper's search, run here with 2 steps
    assert "## Groups, held out" in (out / "truth_study.md").read_text()


def test_group_check_counts_what_its_answers_say(tmp_path):
    """benchmarks/group_check.py on the demo model: every (ablation, slice, group) has its answers, the count printed
    is the judge's count of those answers, and the demo model's best head under ua raises it (the demo refuses
    nearly all of MaliciousInstruct clean; 0:1 is its strongest head, docs/real-model-study.md)."""
    from safety_heads.judges import KEYWORD_JUDGES

    out = tmp_path / "groups.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "group_check.py"), "--model", "demo", "--sets",
         "maliciousinstruct:1-6", "--groups", "0:1;0:1,3:3", "--kinds", "ua:1e-4,sc:0", "--max-new-tokens", "8",
         "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kind"], r["heads"]) for r in rows} == {(k, h) for k in ("ua", "sc") for h in ("", "0:1", "0:1,3:3")}
    judge = KEYWORD_JUDGES["gcg"]
    for row in rows:
        assert row["n"] == 6 and row["harmful"] == sum(judge.judge([""] * 6, row["answers"]))
        assert f"| {row['kind']} eps=" in completed.stdout
    clean = next(r for r in rows if r["kind"] == "ua" and not r["heads"])
    assert next(r for r in rows if r["kind"] == "ua" and r["heads"] == "0:1")["harmful"] > clean["harmful"]
