"""What a Sahara step scores a head set by: the greedy search's objective.

- ``angle`` (the paper's, and `sahara`'s default): the principal angle between the clean and the ablated
  representation of the data set (subspace.py, paper §4.1 Eq. 11). It rewards any change of the representation,
  including changes that leave the refusal intact or make it stronger.
- ``refusal-logprob`` / ``refusal-direction``: the mean, over the data set's queries, of a refusal score's drop when the
  whole head set is ablated together (refusal.py: the same per-query scores `ships --score` offers per head). They
  reward weakening the refusal itself. Learned from the clean model on splits no evaluation uses.

For every objective higher is better: each greedy step adds the head that maximises it (ties: the lowest
(layer, head)). Each objective's engine calls batch every candidate set of a call on the batch axis, as before.

    safety-heads sahara --model demo --dataset maliciousinstruct --limit 8 --objective refusal-logprob --out runs/sr
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ablation import Ablation, Head
from .refusal import RefusalSignal, readouts_for, score_values
from .subspace import angles_to_basis, angles_to_column, left_basis, unit_column

OBJECTIVES = ("angle", "refusal-logprob", "refusal-direction")
# How a step's score reads, in progress lines, the CLI's summary, figures and the report.
UNITS = {"angle": "deg", "refusal-logprob": "nats", "refusal-direction": "(residual units)"}
LABELS = {
    "angle": "principal angle to clean, degrees",
    "refusal-logprob": "mean drop in log P(refusal opening), nats",
    "refusal-direction": "mean drop along the refusal direction",
}


class AngleObjective:
    """The paper's score: the sum of principal angles between M_clean's and M_T's top-R left singular subspaces (or
    the paper-era column angle), M = one hidden-state row per query."""

    name = "angle"

    def __init__(self, engine, rank: int, paper_era: bool):
        self.engine, self.rank, self.paper_era = engine, rank, paper_era

    def reference(self, clean: torch.Tensor) -> torch.Tensor:
        """What every ablated M is compared with: U_clean[:, :R], or column 0 (normalised) for paper-era."""
        return unit_column(clean) if self.paper_era else left_basis(clean, self.rank)

    def score(self, tokens: Sequence[Sequence[int]], reference: torch.Tensor, head_sets: Sequence[Sequence[Head]],
              ablation: Ablation, stats: dict) -> torch.Tensor:
        """The score of each head set (all its heads ablated together) over all queries: [K] float64."""
        result = self.engine.run(tokens, head_sets, ablation=ablation, readouts=("hidden",))
        stats["flops"] = stats.get("flops", 0.0) + result.stats.get("flops", 0.0)
        ablated = result.hidden.transpose(0, 1)  # [K, N, d]
        return angles_to_column(reference, ablated) if self.paper_era else angles_to_basis(reference, ablated)


class RefusalObjective:
    """The mean over queries of a refusal score's drop (refusal.score_values) with the whole head set ablated:
    positive = the set weakens the refusal the clean model shows on these queries."""

    def __init__(self, engine, name: str, signal: RefusalSignal):
        self.engine, self.name, self.signal = engine, name, signal

    def reference(self, clean: torch.Tensor) -> None:
        """Nothing: the clean readouts a drop is measured from come from each engine call's own clean pass."""
        return None

    def score(self, tokens: Sequence[Sequence[int]], reference: None, head_sets: Sequence[Sequence[Head]],
              ablation: Ablation, stats: dict) -> torch.Tensor:
        """[K] float64. Each chunk's readouts are reduced as they come, so a call never holds [N, K, vocab] logits."""
        drops = torch.full((len(head_sets), len(tokens)), float("nan"), dtype=torch.float64)
        clean: dict[int, tuple] = {}
        for what, part in self.engine.stream(tokens, head_sets, ablation=ablation, readouts=readouts_for(self.name),
                                             stats=stats):
            for column, prompt in enumerate(part.prompt_indices):
                if what == "clean":
                    clean[prompt] = (_pick(part.logits, column), _pick(part.hidden, column))
                    continue
                clean_logits, clean_hidden = clean[prompt]
                values = score_values(self.name, clean_logits, _pick(part.logits, column, sets=True), clean_hidden,
                                      _pick(part.hidden, column, sets=True), self.signal)
                drops[list(part.set_indices), prompt] = values
        if torch.isnan(drops).any():
            raise RuntimeError("the engine left a (head set, query) pair unscored")
        return drops.mean(dim=1)


def _pick(values: torch.Tensor | None, index: int, sets: bool = False) -> torch.Tensor | None:
    """A prompt's clean readout ([prompts, width] -> [width]) or its ablated ones ([sets, prompts, width] -> [sets,
    width])."""
    if values is None:
        return None
    return values[:, index] if sets else values[index]


__all__ = ["OBJECTIVES", "UNITS", "LABELS", "AngleObjective", "RefusalObjective"]
