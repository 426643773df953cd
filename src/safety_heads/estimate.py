"""A fast estimate of every head's Ships score for one prompt, from a few forward and backward rows.

Ships scores head h by KL(p || q_h): p is the clean next-token distribution at the prompt's last position, q_h the
same with h ablated. The exact score costs a forward pass per head (batched by the engine, still L*H rows). Here all
L*H scores come from two small traces. Two estimators share the second-order expansion below:

- ``fisher`` (the default, deterministic). (1) The exact change each head's ablation makes at its layer's output
  site with every lower layer clean, for all heads at once: a two-row pass in which row 1 ablates every head of each
  layer, the change is read at the output projection's input and then undone, so the next layer sees clean inputs
  (``intrace.layer_deltas``; heads do not mix before the projection). For ``ua`` this is the true effect of
  flattened attention, not a linearised softmax. (2) One forward+backward pass over `top_tokens` + 1 rows: row r
  backpropagates the logit of the clean model's r-th most likely next token, the last row the probability-weighted
  mean logit of all other tokens (``intrace.fisher_dots``). With d_r[h] = grad_r . delta_h (the first-order change
  of that logit) and m_r the rows' probabilities, the next-token Fisher's quadratic form is exactly

      KL_h ~= 1/2 * (sum_r m_r d_r[h]^2 - (sum_r m_r d_r[h])^2)

  up to the lumped tail (which under-counts the variance among the tail's tokens: small when the top tokens hold
  most of p, as for an aligned model's first response token). Cost: 2 + 3 * (top_tokens + 1) row-passes, against
  about H(L+1)/2 for the exact sweep. What remains approximate is the propagation of each change through the later
  layers (first order); tests/test_estimate.py checks that with every token kept and a 10% ablation the estimate
  equals the exact KL to within 10% per head, and measures the ranking on five families; benchmarks/RESULTS.md
  measures it on a real model.
- ``sampled``: the change linearised at the ablation site and the Fisher sampled, as follows.

**The approximation.** Write z for the activation at the ablation site (all layers, all positions) and delta for the
change an ablation makes there. KL(p || q_delta) is zero, with zero gradient, at delta = 0, so its expansion starts at
second order:

    KL(p || q_delta) ~= 1/2 delta^T F delta,      F = E_{y ~ p}[ g(y) g(y)^T ],  g(y) = d log q_z(y) / dz at clean z

(F is the Fisher information of the next-token distribution with respect to z). A first-order KL attribution is
identically zero, which is why the gradient of KL itself is useless here (reference/nnsight.md section 4).

**Sampling F.** Expand the prompt to K identical rows, draw y_k ~ p independently per row, and backpropagate
sum_k log q_k(y_k) at the last position in one backward pass. Rows do not interact, so row k's gradient g_k at the
site is exactly g(y_k), independent of the other rows, and

    KL_h ~= 1/2 * (1/K) sum_k (g_k[h] . delta_h)^2

where the dot runs over every position and the head's dimensions. This is an unbiased Monte-Carlo estimate of the
quadratic form; its relative standard error shrinks like 1/sqrt(K). The draws y_k use inverse-CDF sampling of p with
uniforms from a seeded CPU `torch.Generator` (drawn before the trace), so a seed gives the same samples on any
device, and only K numbers enter the trace.

**delta_h per kind** (a = the head's slice of the output projection's input, q = its query at the query site):

- ``sc``:   delta_h = (epsilon - 1) * a_h, at the output site (exact: the ablation *is* that additive change);
- ``mean``: delta_h = mean_h - a_h, at the output site (exact likewise);
- ``ua``:   delta_h = (epsilon - 1) * q_h, at the query site (q_proj / fused query block / q_norm output).

For ``sc`` and ``mean`` the only error is the quadratic expansion of KL in delta (plus sampling). For ``ua`` there is
a second, usually larger one: scaling q by epsilon changes the head's output through a softmax of q.k, so the change
at the output site is itself a nonlinear function of delta_q. Linearising it at the clean q mis-states heads whose
attention is sharp (the softmax saturates: the true change, uniform attention, can be large while the gradient in q is
small). The estimate ranks ``ua`` heads less faithfully than ``sc`` heads; tests/test_estimate.py measures both. Use
it to shortlist heads and verify the shortlist with the exact engine.

Cost. Rows x layers is the unit: the estimate runs K rows forward and backward (~3K row-passes of every layer),
the exact engine with prefix reuse ~H(L+1)/2 row-passes of every layer (L layers, H heads per layer). So the estimate
is faster only when K is well below H(L+1)/6: measured on CPU, 8 layers x 16 heads (break-even K ~ 24) it took 0.5x
the exact time at K=64 and 2-2.6x less at K=16; on the 4 x 8 built-in tiny model the exact engine was faster at both K;
for Llama-2-7b (32 x 32, break-even ~176) this count predicts K=64 ~2.7x cheaper (not measured). Lower K buys
speed with noise.

Memory: a forward pass with gradients over K rows of one prompt, plus one [1, positions, width] delta per layer.
For large models set `EstimateConfig.samples_per_pass` below `samples`: the rows are then run in several
forward+backward passes whose per-row products are accumulated (the rows are independent, so this is exact
gradient accumulation, and a seed gives the same draws however the rows are chunked).

    python -c "from safety_heads.models import load_model, ModelConfig; from safety_heads.engine import Engine; \
from safety_heads.estimate import estimate_scores; from safety_heads.ablation import Ablation; \
e = Engine(load_model(ModelConfig())); print(estimate_scores(e, e.tokenize(['How do I pick a lock?'])[0], ablation=Ablation()))"
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import intrace
from .ablation import Ablation, require_means
from .checked import Checked
from .engine import Engine
from .errors import UserError
from .layout import HeadLayout

ESTIMATORS = ("fisher", "sampled")


@dataclass
class EstimateConfig(Checked):
    """How the gradient estimate works. Shared by the command line and the Python API."""

    # "fisher": exact per-layer changes and the Fisher over the clean model's top tokens (deterministic, top_tokens + 3
    # row-passes); "sampled": changes linearised at the ablation site and a sampled Fisher (K = samples rows).
    estimator: str = "fisher"
    top_tokens: int = 8  # fisher: next tokens whose logits are backpropagated one by one (the rest as one lump)
    samples: int = 64  # sampled: K draws y_k ~ p, one batch row each; a score's relative noise is roughly sqrt(2/K)
    seed: int = 0
    samples_per_pass: int | None = None  # sampled: rows per forward+backward pass; None = all `samples` in one pass

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise UserError(f"unknown estimator '{self.estimator}'; choose one of {', '.join(ESTIMATORS)}")
        if not isinstance(self.top_tokens, int) or self.top_tokens < 1:
            raise UserError(f"--top-tokens must be a whole number of at least 1, not {self.top_tokens!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise UserError(f"--samples must be a whole number of at least 1, not {self.samples!r}")
        if self.samples_per_pass is not None and (not isinstance(self.samples_per_pass, int) or self.samples_per_pass < 1):
            raise UserError(f"--samples-per-pass must be a whole number of at least 1, not {self.samples_per_pass!r}")


def estimate_scores(
    engine: Engine,
    token_ids: Sequence[int],
    *,
    ablation: Ablation = Ablation(),
    config: EstimateConfig | None = None,
) -> torch.Tensor:
    """Estimated KL(p_clean || p_ablated(h)) for every head h alone, [n_layers, n_heads] float64, all >= 0.

    `token_ids` is one prompt, already tokenised (Engine.tokenize). `ablation` gives the kind and epsilon, and for
    kind "mean" the means ([n_layers, n_heads * head_dim], from Engine.head_means); its `heads` must be empty (every
    head is scored on its own). See the module docstring for the method and its limits.
    """
    config = config or EstimateConfig()
    if ablation.heads:
        raise ValueError("estimate_scores scores every head alone; give an Ablation without heads")
    _check_means(ablation, engine.layout)
    tokens = engine.tokenize([list(token_ids)])
    batch = engine.batch(tokens, [0])
    if config.estimator == "fisher":
        return _fisher_estimate(engine, batch, config.top_tokens, ablation)
    # Inverse-CDF uniforms, one per row, drawn on the CPU before any trace: reproducible on any device and chunking.
    uniforms = torch.rand(config.samples, generator=torch.Generator().manual_seed(config.seed), dtype=torch.float64)
    per_pass = config.samples_per_pass or config.samples
    squares = torch.zeros(engine.layout.n_layers, engine.layout.n_heads, dtype=torch.float64)
    with _frozen(engine):
        for start in range(0, config.samples, per_pass):
            dots = _head_dots(engine, batch, uniforms[start : start + per_pass], ablation)  # [L, K, H]
            squares += dots.square().sum(dim=1)
    return 0.5 * squares / config.samples


def _check_means(ablation: Ablation, layout: HeadLayout) -> None:
    """A mean ablation needs means of the model's shape (the estimate reads every layer's)."""
    require_means(ablation)
    if ablation.kind == "mean" and tuple(ablation.means.shape) != (layout.n_layers, layout.n_heads * layout.head_dim):
        raise UserError(
            f"means must be [n_layers, n_heads * head_dim] = [{layout.n_layers}, {layout.n_heads * layout.head_dim}], "
            f"not {list(ablation.means.shape)}"
        )


def _fisher_estimate(engine: Engine, batch, top_tokens: int, ablation: Ablation) -> torch.Tensor:
    """KL_h ~= 1/2 (sum_r m_r d_r[h]^2 - (sum_r m_r d_r[h])^2): the next-token Fisher's quadratic form in the logit
    changes d_r (rows r: the top tokens and the lumped rest, with probabilities m_r). One request when remote."""
    vocabulary = engine.model.lm.config.get_text_config().vocab_size
    n_top = min(top_tokens, vocabulary - 1)
    arguments = (_input_embedding_path(engine), engine.runner.inputs(batch.repeated(1)), n_top, ablation.in_trace(ablation.means))
    with _frozen(engine):
        dots, mass = engine.runner.run(intrace.fisher_estimate, *arguments, label="estimate request")
    gc.collect(1)  # the backward trace's reference cycle (see _head_dots)
    changes = torch.stack([d.cpu().double() for d in dots])  # [L, rows, H]
    weights = mass.cpu().double()[None, :, None]
    mean = (weights * changes).sum(dim=1)
    return (0.5 * ((weights * changes.square()).sum(dim=1) - mean.square())).clamp(min=0.0)


def _head_dots(engine: Engine, batch, uniforms: torch.Tensor, ablation: Ablation) -> torch.Tensor:
    """One forward+backward pass over len(uniforms) rows: g_k[h] . delta_h for every layer, row and head, [L, K, H].

    The trace is intrace.head_dots (it travels to NDIF by value); remote, it is one request per pass."""
    embedding = _input_embedding_path(engine)
    arguments = (embedding, engine.runner.inputs(batch.repeated(1)), uniforms, ablation.in_trace(ablation.means))
    dots = engine.runner.run(intrace.head_dots, *arguments, label=f"gradient-estimate request ({len(uniforms)} samples)")
    # A backward inside a trace leaves one reference cycle per trace, holding its tensors (nnsight.md section 4). The
    # cycle is young: a generation-1 collection frees all of it (measured: no tensor left over 30 calls, 4- and
    # 16-layer models) in well under a millisecond, where a full gc.collect() walks every object transformers and
    # torch keep alive, ~0.2 s, more than the whole estimate on a small model.
    gc.collect(1)
    return torch.stack([d.cpu() for d in dots])


def _input_embedding_path(engine: Engine) -> str:
    """The attribute path of the token embedding module (model.embed_tokens, transformer.wte, ...)."""
    module = engine.model.module
    embedding = module.get_input_embeddings()
    for name, candidate in module.named_modules():
        if candidate is embedding and name:
            return name
    raise UserError(f"cannot find the input embedding of {engine.model.name}; the gradient estimate needs it")


@contextlib.contextmanager
def _frozen(engine: Engine) -> Iterator[None]:
    """Turn parameter gradients off for the duration (less memory, and no `.grad` left on the user's weights)."""
    parameters = list(engine.model.module.parameters())  # a remote client's are weightless (meta): harmless
    flags = [parameter.requires_grad for parameter in parameters]
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


__all__ = ["EstimateConfig", "estimate_scores"]
