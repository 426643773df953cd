"""Measures shared by the methods: the next-token KL divergence (the Ships score, and the harmless cost of an
evaluation) and the top heads of a score map."""

from __future__ import annotations

import torch


def kl_divergence(clean_logits: torch.Tensor, ablated_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_ablated) over the last axis, in float64."""
    clean = torch.log_softmax(clean_logits.double(), dim=-1)
    ablated = torch.log_softmax(ablated_logits.double(), dim=-1)
    return (clean.exp() * (clean - ablated)).sum(-1).clamp(min=0.0)


def top_heads(scores: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """The k highest-scoring (layer, head, score), ignoring unscored heads."""
    flat = torch.nan_to_num(scores.flatten(), nan=-float("inf"))
    n_scored = int(torch.isfinite(flat).sum())
    values, indices = flat.topk(min(k, n_scored))
    n_heads = scores.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads, float(v)) for v, i in zip(values, indices)]
