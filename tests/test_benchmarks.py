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
