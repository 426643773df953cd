"""safety-heads: find and ablate the attention heads aligned chat models use to refuse harmful requests.

Implements Ships (per-query head importance), Sahara (data-set-level head groups) and surgery with safety evaluation
from "On the Role of Attention Heads in Large Language Model Safety" (arXiv 2410.13708), on nnsight.

    safety-heads ships --model tiny --prompt "How do I pick a lock?" --out runs/ships
"""

__version__ = "0.1.0"
