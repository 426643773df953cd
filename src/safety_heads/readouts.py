"""What a forward pass hands back: last-position readouts as float32 on the CPU, checked for non-finite values.

Shared by the engine's local passes (engine.py) and its remote requests (remote_requests.py), which yield the same
`ChunkResult`s, count the same statistics and report an overflow in the same line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass
class ChunkResult:
    """What one forward pass produced: readouts for `set_indices` x `prompt_indices` (sets first)."""

    prompt_indices: list[int]
    set_indices: tuple[int, ...]
    logits: torch.Tensor | None  # [sets, prompts, vocab]
    hidden: torch.Tensor | None


def to_cpu_float(values: torch.Tensor | None) -> torch.Tensor | None:
    """[rows, ...] readouts as float32 [rows, width] on the CPU."""
    if values is None:
        return None
    return values.detach().to(device="cpu", dtype=torch.float32).reshape(values.shape[0], -1)


def by_set(values: torch.Tensor | None, n_sets: int, n_prompts: int) -> torch.Tensor | None:
    """[sets * prompts, width] readouts as float32 [sets, prompts, width] on the CPU."""
    values = to_cpu_float(values)
    return None if values is None else values.view(n_sets, n_prompts, -1)


def finite(*values: torch.Tensor | None) -> bool:
    return all(v is None or bool(torch.isfinite(v).all()) for v in values)


def first_non_finite(start_layer: int, flags: Sequence[bool]) -> int | None:
    """The first layer whose output was not finite, from a diagnosis pass's per-layer flags (None: all were)."""
    return next((start_layer + i for i, ok in enumerate(flags) if not ok), None)


def report_non_finite(what: str, layer: int | None, dtype: torch.dtype) -> None:
    where = f"from layer {layer} on" if layer is not None else "after the last layer (final norm or unembedding)"
    advice = "rerun with --dtype float32" if dtype != torch.float32 else "check the model's weights (float32 already)"
    raise UserError(f"{what} produced non-finite values {where} (overflow in {str(dtype).removeprefix('torch.')}?); {advice}")


def check_finite(what: str, dtype: torch.dtype, diagnose: Callable[[], int | None], *values: torch.Tensor | None) -> None:
    """Raise the one-line overflow report when any of `values` is not finite; `diagnose()` (run only then) names
    the first layer that overflowed."""
    if not finite(*values):
        report_non_finite(what, diagnose(), dtype)


def count_pass(stats: dict, rows: int, layers: int, flops: float) -> None:
    """Add one forward pass to the statistics the benchmarks report."""
    stats["traces"] += 1
    stats["rows"] += rows
    stats["layer_rows"] += rows * layers
    stats["flops"] += flops
