"""notebooks/demo.ipynb runs end to end: its code cells, in order, in one fresh interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "demo.ipynb"


def test_notebook_runs_end_to_end(tmp_path):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    script = tmp_path / "notebook.py"
    script.write_text(source.replace("plt.show()", "plt.close('all')"))
    env = {**os.environ, "SAFETY_HEADS_QUICK": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Sahara group:" in done.stdout
    difference = float(done.stdout.split("max |baked - traced| = ")[1].split()[0])
    assert difference < 1e-4  # the saved surgery reproduces the traced ablation
    assert "ASR" in done.stdout and "CONTENT WARNING" in done.stdout
