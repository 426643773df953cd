"""The runs layer: results on disk. Methods (ships.py, sahara.py, evaluate.py) compute and yield units of work; this
package owns the output folder (one writer, a lock), the checkpoint and `--resume` (one loop for every command:
folder.run_job), the atomic result files and the pictures written beside them.

    from safety_heads.runs import run_ships
    run_ships(model, ["How do I pick a lock?"], ShipsConfig(), out="runs/one")
"""

from .evaluate import choose_heads, run_evaluation
from .sahara import run_sahara
from .ships import run_ships

__all__ = ["run_ships", "run_sahara", "run_evaluation", "choose_heads"]
