"""What a forward pass costs in floating-point operations, and how fast this machine multiplies matrices.

The engine counts the FLOPs of every pass it runs (`EngineResult.stats["flops"]`) with `FlopModel`: per token and
decoder layer, two per weight of the layer's linear maps (a multiply and an add), plus the attention scores and the
weighted sum of values, four per head dimension and attended position (eager attention computes every position of
the padded context); per readout row, two per weight of the unembedding (`logits_to_keep=1`). Norms, activations,
RoPE and softmax are left out: on these shapes they are a few percent. `matmul_throughput` measures what the
machine achieves on the model's own matrix shapes, in the model's dtype, so `achieved / peak` says how close a run
came to the hardware (benchmarks/flop_account.py).

    python benchmarks/flop_account.py --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of one model's forward passes (see the module docstring for what is counted)."""

    layer_weights: int  # weights of one decoder layer's linear maps (q, k, v, o, MLP)
    attention_width: int  # n_heads * head_dim: query-key products and value sums per attended position
    head_weights: int  # weights of the unembedding (vocabulary x hidden)

    def layers(self, rows: int, positions: int, context: int, n_layers: int) -> float:
        """`n_layers` decoder layers on `rows` rows of `positions` new tokens, each attending to `context` positions."""
        per_token = 2 * self.layer_weights + 4 * self.attention_width * context
        return float(rows) * positions * n_layers * per_token

    def head(self, rows: int) -> float:
        """The unembedding at one position of `rows` rows."""
        return 2.0 * rows * self.head_weights


def flop_model(module: torch.nn.Module, layers: torch.nn.ModuleList, n_heads: int, head_dim: int) -> FlopModel:
    """Count one decoder layer's linear weights (nn.Linear, and GPT-2's Conv1D, by their 2-D `weight`) and the
    unembedding's."""
    layer = layers[0]
    weights = sum(m.weight.numel() for m in layer.modules() if _is_linear(m))
    output = module.get_output_embeddings()
    return FlopModel(weights, n_heads * head_dim, output.weight.numel() if output is not None else 0)


def _is_linear(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, torch.nn.Embedding)


def matmul_throughput(d_model: int, intermediate: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                      rows: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of this machine on the model's own shapes: [rows, d_model] x [d_model, intermediate] and back, the
    MLP's matrices, which dominate a layer. The best of repeated timings over about `seconds`."""
    a = torch.randn(rows, d_model, dtype=dtype, device=device)
    up = torch.randn(d_model, intermediate, dtype=dtype, device=device)
    down = torch.randn(intermediate, d_model, dtype=dtype, device=device)
    flops = 2.0 * rows * d_model * intermediate * 2
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for attempt in range(1000):
        _sync(device)
        start = time.perf_counter()
        (a @ up) @ down
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if attempt >= 2 and time.perf_counter() > deadline:
            break
    return flops / best


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


__all__ = ["FlopModel", "flop_model", "matmul_throughput"]
