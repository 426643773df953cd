"""An ablation: which heads, how (kind) and how strongly (epsilon); applied inside a trace or baked into weights.

Kinds (docs/ablation-kinds.md has the derivations):

- ``ua``, undifferentiated attention (the paper's default): multiply the head's *query* by epsilon. Its attention
  logits shrink by epsilon, so at epsilon -> 0 it attends uniformly over its causal prefix and writes the mean of its
  values. It does not remove the head.
- ``sc``, scaling contribution: multiply the head's *output* (its slice of the output projection's input) by epsilon.
- ``mean``: replace the head's output by its mean over a reference batch (see `engine.Engine.head_means`).

Heads are query-head indices, written ``layer:head`` (``2:26,3:8``). Never ablate through k_proj/v_proj (under
grouped-query attention that hits a whole group) or after o_proj (where heads no longer exist).

    safety-heads heads --model tiny --heads "0-1:*"
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .layout import HeadLayout, layer_part

KINDS = ("ua", "sc", "mean")
DEFAULT_EPSILON = 1e-4  # get_ships.py's value; the paper's Sahara code used 1e-5, its surgery 1e-10

Head = tuple[int, int]


@dataclass(frozen=True, eq=False)
class Ablation:
    """How to ablate: which heads, the kind and its epsilon (and, for ``mean``, the reference means), checked once,
    here. The engine's multi-set calls (`Engine.run`, ...) ablate each head set plus `heads` (usually empty there);
    `generate` adds `heads` to every row; `bake_into_weights` edits exactly `heads`."""

    heads: tuple[Head, ...] = ()
    kind: str = "ua"
    epsilon: float = DEFAULT_EPSILON
    # For kind "mean": the mean of each layer's output-projection input, [n_layers, n_heads * head_dim]. Whoever
    # runs a mean ablation checks it is there (the engine, with a message that says where means come from).
    means: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_kind(self.kind)
        check_epsilon(self.epsilon)
        object.__setattr__(self, "heads", tuple(self.heads))  # callers pass lists too; frozen, so set it this way

    def with_heads(self, heads) -> Ablation:
        """The same kind, epsilon and means on other heads."""
        return replace(self, heads=tuple(heads))

    def check(self, layout: HeadLayout) -> None:
        for layer, head in self.heads:
            layout.check_head(layer, head)

    @property
    def spec(self) -> str:
        return format_heads(self.heads)

    def in_trace(self, means) -> dict:
        """The plain dict the in-trace functions take (intrace.py: NDIF rebuilds them without this class): kind,
        epsilon and the means a call sends (`means`: those of the layers it ablates, all of them, or None)."""
        return {"kind": self.kind, "epsilon": float(self.epsilon), "means": means}


@dataclass(frozen=True)
class AblationConfig:
    """How a command ablates heads, one setting nested in every config that ablates (ShipsConfig.ablation, ...): the
    kind, its epsilon and, for kind ``mean``, the data set whose mean head outputs are substituted (its first
    `mean_reference_limit` prompts, in the run's own template). Checked when made. `evaluate` alone leaves kind and
    epsilon None, "not given": its --from file's are taken, else INHERITED's (evaluate.with_source_settings).
    Engine.ablation turns it into the Ablation a run applies, computing the reference means where the kind needs them."""

    kind: str | None = "ua"
    epsilon: float | None = DEFAULT_EPSILON
    mean_reference: str = "harmless-val"
    mean_reference_limit: int = 64

    def __post_init__(self) -> None:
        if self.kind is not None:
            check_kind(self.kind)
        if self.epsilon is not None:
            check_epsilon(self.epsilon)
        if not isinstance(self.mean_reference_limit, int) or self.mean_reference_limit < 1:
            raise UserError(f"--mean-reference-limit must be at least 1, not {self.mean_reference_limit!r}")

    def ablation(self, heads=(), means: torch.Tensor | None = None) -> Ablation:
        if self.kind is None or self.epsilon is None:
            raise ValueError("an evaluation's ablation setting is used before its --from file's was taken")
        return Ablation(tuple(heads), self.kind, self.epsilon, means)

    def record(self) -> dict:
        """The flat keys every result has recorded its ablation under (ablation, epsilon, mean_reference, ...)."""
        return {"ablation": self.kind, "epsilon": self.epsilon, "mean_reference": self.mean_reference,
                "mean_reference_limit": self.mean_reference_limit}


def require_means(ablation: Ablation) -> None:
    """Where a mean ablation is run: it needs the reference means, which only the caller can compute."""
    if ablation.kind == "mean" and ablation.means is None:
        raise UserError("a mean ablation needs reference means: call Engine.head_means(reference_prompts) first")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown ablation kind '{kind}'; choose one of {', '.join(KINDS)}")


def check_epsilon(epsilon: float) -> None:
    if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or not 0.0 <= epsilon <= 1.0:
        raise UserError(f"epsilon must be a number from 0 to 1 (the paper uses 1e-4), not {epsilon!r}")


# ----------------------------------------------------------------------------------------------------------------
# Head specifications: "2:26,3:8", "0-7:*", "*/4:*" (every 4th layer), "3:0-15/2".

_RANGE = re.compile(r"^(?:(\*)|(\d+)(?:-(\d+))?)(?:/(\d+))?$")


def _expand(text: str, size: int, what: str, spec: str) -> list[int]:
    match = _RANGE.match(text.strip())
    if not match:
        raise UserError(f"malformed {what} '{text}' in head spec '{spec}'; write N, N-M, * or any of them /STEP")
    star, first, last, step = match.groups()
    spec = spec if len(spec) <= 60 else spec[:57] + "..."  # a message stays one readable line
    for number in (first, last, step):
        if number is not None and len(number) > 9:  # int() of thousands of digits is refused (and pointless)
            raise UserError(f"{what} {number[:9]}... in head spec '{spec}' is out of range: this model has {what}s 0-{size - 1}")
    if star:
        low, high = 0, size - 1
    else:
        low = int(first)
        high = int(last) if last is not None else low
    if high < low:
        raise UserError(f"empty {what} range '{text}' in head spec '{spec}'")
    if high >= size:
        raise UserError(f"{what} {high} in head spec '{spec}' is out of range: this model has {what}s 0-{size - 1}")
    stride = int(step) if step else 1
    if stride < 1:
        raise UserError(f"step must be at least 1 in head spec '{spec}'")
    return list(range(low, high + 1, stride))


def parse_heads(spec: str, layout: HeadLayout) -> tuple[Head, ...]:
    """Parse a head specification into sorted, unique (layer, head) pairs, checked against the model."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty head spec; write layer:head pairs such as 2:26,3:8 (or 0-7:* for whole layers)")
    if spec.strip().lower().endswith(".json") or (":" not in spec and Path(spec).expanduser().exists()):
        raise UserError(f"'{spec}' is a file, not a head spec (layer:head pairs such as 2:26,3:8); to take the heads "
                        "from a sahara.json or ships.json, give it to evaluate --from")
    heads: set[Head] = set()
    for item in spec.split(","):
        if item.count(":") != 1:
            raise UserError(f"malformed head '{item.strip()}' in '{spec}'; write layer:head, e.g. 2:26")
        layers_text, heads_text = item.split(":")
        for layer in _expand(layers_text, layout.n_layers, "layer", spec):
            for head in _expand(heads_text, layout.n_heads, "head", spec):
                heads.add((layer, head))
    return tuple(sorted(heads))


def format_heads(heads) -> str:
    return ",".join(f"{layer}:{head}" for layer, head in heads)


# ----------------------------------------------------------------------------------------------------------------
# Inside a trace (intrace.py): a batch whose row i ablates head_sets[i] receives, per layer, the (row, head) pairs
# to ablate there, small int lists it expands into masks itself, so a remote request carries integers, not masks.


def ablation_pairs(head_sets) -> dict[int, tuple[list[int], list[int]]]:
    """Per layer, the (rows, heads) pairs to ablate when row i carries head_sets[i] (intrace.py's `pairs`)."""
    pairs: dict[int, tuple[list[int], list[int]]] = {}
    for row, heads in enumerate(head_sets):
        for layer, head in heads:
            rows, columns = pairs.setdefault(layer, ([], []))
            rows.append(row)
            columns.append(head)
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Weight surgery: the same ablation baked into the weights, so a plain forward pass reproduces the traced one.


@torch.no_grad()
def bake_into_weights(module: nn.Module, layout: HeadLayout, ablation: Ablation) -> None:
    """Edit `module`'s weights in place so that it computes `ablation` with no trace at all.

    ua: the query rows (and query bias) of each head x epsilon. sc: the head's input columns of the output
    projection x epsilon. mean: those columns zeroed and their contribution at the mean folded into the output
    projection's bias (created if the projection has none).
    """
    ablation.check(layout)
    require_means(ablation)
    if ablation.kind == "ua" and layout.query_weight_path is None:
        raise UserError(
            f"'ua' cannot be baked into the weights of a {layout.model_type} model: a per-head query norm sits between "
            "the query projection and attention and would undo the scaling; use --ablation sc, or keep 'ua' in traces"
        )
    for layer, head in ablation.heads:
        columns = layout.head_slice(head)
        if ablation.kind == "ua":
            projection = layer_part(module, layout, layer, layout.query_weight_path)
            rows = slice(layout.query_offset + columns.start, layout.query_offset + columns.stop)
            _scale_out_features(projection, layout, rows, ablation.epsilon)
        else:
            projection = layer_part(module, layout, layer, layout.output_path)
            weight = projection.weight if layout.weight_layout == "linear" else projection.weight.T
            if ablation.kind == "sc":
                weight[:, columns] *= ablation.epsilon
            else:
                mean = ablation.means[layer, columns].to(weight.dtype).to(weight.device)
                shift = weight[:, columns] @ mean
                weight[:, columns] = 0
                if projection.bias is None:
                    projection.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
                projection.bias += shift


def _scale_out_features(projection: nn.Module, layout: HeadLayout, rows: slice, factor: float) -> None:
    if layout.weight_layout == "linear":
        projection.weight[rows] *= factor
    else:
        projection.weight[:, rows] *= factor
    if projection.bias is not None:
        projection.bias[rows] *= factor
