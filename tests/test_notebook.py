"""notebooks/demo.ipynb runs end to end: its code cells, in order, in one fresh interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

from devices import TEST_DEVICE

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "demo.ipynb"


def run_notebook(folder: Path, **environment: str) -> subprocess.CompletedProcess:
    """The notebook's code cells, in order, as one script in a fresh interpreter (quick mode); also used by
    test_ndif.py with SAFETY_HEADS_REMOTE set."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    script = folder / "notebook.py"
    script.write_text(source.replace("plt.show()", "plt.close('all')"))
    env = {**os.environ, "SAFETY_HEADS_QUICK": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", **environment}
    if TEST_DEVICE == "cpu":  # the checks below were set in float32; on a GPU "auto" would load the model in bfloat16
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=folder, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_notebook_runs_end_to_end(tmp_path):
    done = run_notebook(tmp_path)
    assert "Sahara group:" in done.stdout
    difference = float(done.stdout.split("max |baked - traced| = ")[1].split()[0])
    assert difference < 1e-4  # the saved surgery reproduces the traced ablation
    assert "ASR" in done.stdout and "CONTENT WARNING" in done.stdout
    flipped = int(done.stdout.split(" answers flipped from refusal to compliance")[0].rsplit("\n", 1)[-1].split(" of ")[0])
    assert flipped >= 1  # the example shown is an answer the ablation turned from a refusal into compliance


def test_notebook_cells_have_ids_and_its_plot_shows():
    notebook = json.loads(NOTEBOOK.read_text())
    ids = [cell.get("id") for cell in notebook["cells"]]
    assert all(ids) and len(set(ids)) == len(ids) and (notebook["nbformat"], notebook["nbformat_minor"]) >= (4, 5)
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    assert "plt.show()" in code and 'matplotlib.use("Agg")' not in code  # Agg before show() showed nothing
