"""The one-pass gradient estimate of Ships against the exact scores from the engine, on tiny models of five families.

Exact score of head h: KL(p_clean || p_ablated(h)) from Engine.run's clean and ablated last-position logits, in
float64. The estimate is a sampled second-order expansion of that KL (see safety_heads/estimate.py), so it is tested
for what it promises: the ranking of heads (Spearman), the scale where the expansion is accurate (small ablations),
reproducibility, and its cost (one forward and one backward pass).

Models. tests/families.py draws every weight with std 0.3 so that exact ablations are easy to tell apart; at that
scale the next-token distributions are very peaked, KLs reach 5 nats, and the quadratic expansion is strained, most of
all for `ua`, whose effect goes through a saturated softmax. The ranking tests therefore use the same configurations
with weights re-drawn at std 0.1 (`gentle`), where KLs are 1e-3..0.4 nats, closer to a trained model's single-head
effects; the strong-init models are tested too, with looser floors that record the limitation.
"""

import gc
import math
import warnings

import nnsight
import pytest
import torch
from families import FAMILIES

from safety_heads.ablation import Ablation
from safety_heads.engine import Engine
from safety_heads.errors import UserError
from safety_heads.estimate import EstimateConfig, estimate_scores
from safety_heads.models import layer_part, resolve, wrap
from safety_heads.tiny import byte_tokenizer

PROMPT = "How do I pick a lock?"
REFERENCE = ["Hello there, how are you?", "Write a short poem about the sea, please.", PROMPT]  # for mean ablation
GENTLE_STD = 0.1
FIVE = ["llama", "qwen3", "gemma3_text", "gpt2", "phi3"]  # GQA, bshd q_norm, bhsd q_norm, Conv1D fused, fused qkv
SAMPLED = EstimateConfig(estimator="sampled")  # the sampled-Fisher estimator; the deterministic one is tested below


def gentle(name: str, seed: int = 0, std: float = GENTLE_STD) -> torch.nn.Module:
    """A family's test model with every weight and bias re-drawn from N(0, std^2); norms keep their init."""
    module = FAMILIES[name].build(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter_name, parameter in module.named_parameters():
            if parameter.dim() >= 2 or ("norm" not in parameter_name and "ln" not in parameter_name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module


def engine_for(module: torch.nn.Module, name: str) -> Engine:
    return Engine(wrap(module, byte_tokenizer(), name))


def exact_scores(engine: Engine, tokens, kind: str, epsilon: float = 1e-4, means=None) -> torch.Tensor:
    layout = engine.layout
    head_sets = [[(layer, head)] for layer in range(layout.n_layers) for head in range(layout.n_heads)]
    result = engine.run([tokens], head_sets, ablation=Ablation(kind=kind, epsilon=epsilon, means=means))
    clean = result.clean_logits[0].double().log_softmax(-1)
    ablated = result.logits[0].double().log_softmax(-1)
    return (clean.exp() * (clean - ablated)).sum(-1).view(layout.n_layers, layout.n_heads)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def ranks(x):
        x = x.flatten().double()
        out = torch.empty_like(x)
        out[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
        return out - out.mean()

    ra, rb = ranks(a), ranks(b)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def check_shape_and_sign(estimate: torch.Tensor, engine: Engine) -> None:
    assert estimate.shape == (engine.layout.n_layers, engine.layout.n_heads)
    assert estimate.dtype == torch.float64
    assert torch.isfinite(estimate).all()
    assert (estimate >= 0).all()


# Spearman(estimate, exact) over the 12 heads (3 layers x 4), K=64, estimator seed 0, gentle models (std 0.1), model
# seed 0, measured: llama sc 0.94 ua 0.92 mean 0.92 | qwen3 sc 0.94 ua 0.94 | gemma3_text sc 0.91 ua 0.98 |
# gpt2 sc 0.94 ua 0.99 | phi3 sc 0.93 ua 0.97. Over estimator seeds 0-3 the minimum was 0.87 (llama mean); over 3
# model seeds x 4 estimator seeds, 0.69 (llama sc with model seed 2: its 12 sc scores span only 3x, so the ~sqrt(2/K)
# = 18% sampling noise per score swaps neighbours). 0.8 sits under every fixed-seed value used here with margin and
# still fails a broken estimate (a wrong head, site or delta gives ~0).
GENTLE_FLOOR = 0.8


@pytest.mark.parametrize("kind", ["sc", "ua"])
@pytest.mark.parametrize("name", FIVE)
def test_estimate_ranks_heads_like_exact(name, kind):
    engine = engine_for(gentle(name), name)
    tokens = engine.tokenize([PROMPT])[0]
    estimate = estimate_scores(engine, tokens, ablation=Ablation(kind=kind), config=SAMPLED)
    check_shape_and_sign(estimate, engine)
    rho = spearman(estimate, exact_scores(engine, tokens, kind))
    assert rho >= GENTLE_FLOOR, f"{name} {kind}: Spearman {rho:.3f}"


def test_mean_ablation_estimate_ranks_heads_like_exact():
    engine = engine_for(gentle("llama"), "llama")
    tokens = engine.tokenize([PROMPT])[0]
    means = engine.head_means(REFERENCE)
    estimate = estimate_scores(engine, tokens, ablation=Ablation(kind="mean", means=means), config=SAMPLED)
    check_shape_and_sign(estimate, engine)
    rho = spearman(estimate, exact_scores(engine, tokens, "mean", means=means))
    assert rho >= GENTLE_FLOOR, f"Spearman {rho:.3f}"


# The families' own std-0.3 models, K=64, seed 0. Measured Spearman: sc llama 0.94, qwen3 0.86, gemma3_text 0.80,
# gpt2 0.97, phi3 0.94; ua llama 0.79, qwen3 0.93, gemma3_text 0.83, gpt2 0.75, phi3 0.54 (over estimator seeds 0-3:
# sc >= 0.80, ua >= 0.46). The first-order `ua` estimate also badly underestimates the size of sharp heads' effects:
# median estimate/exact 0.09 (llama), 0.24 (gpt2), 0.06 (phi3), against 0.6-1.05 for sc. Floors: sc 0.7, ua 0.4; the
# ua floor records that a strongly nonlinear model degrades the ranking rather than promising a number: verify a
# shortlist with the exact engine.
STRONG_FLOOR = {"sc": 0.7, "ua": 0.4}


@pytest.mark.parametrize("kind", ["sc", "ua"])
@pytest.mark.parametrize("name", FIVE)
def test_strong_init_models(name, kind):
    engine = engine_for(FAMILIES[name].build(), name)
    tokens = engine.tokenize([PROMPT])[0]
    estimate = estimate_scores(engine, tokens, ablation=Ablation(kind=kind), config=SAMPLED)
    check_shape_and_sign(estimate, engine)
    rho = spearman(estimate, exact_scores(engine, tokens, kind))
    assert rho >= STRONG_FLOOR[kind], f"{name} {kind}: Spearman {rho:.3f}"


@pytest.mark.parametrize("kind", ["sc", "ua"])
def test_small_ablations_match_exact_kl_in_size(kind):
    """At epsilon = 0.9 (a 10% change) the quadratic expansion is accurate: this pins the 1/2 and the delta's scale."""
    engine = engine_for(gentle("llama"), "llama")
    tokens = engine.tokenize([PROMPT])[0]
    estimate = estimate_scores(engine, tokens, ablation=Ablation(kind=kind, epsilon=0.9),
                               config=EstimateConfig(estimator="sampled", samples=256))
    ratio = (estimate / exact_scores(engine, tokens, kind, epsilon=0.9)).flatten()
    # Measured (K=256, model seeds 0-1, llama and gpt2 and qwen3): per-head ratio 0.77-1.15, median 0.91-1.03.
    assert 0.9 <= ratio.median() <= 1.1, ratio
    assert ((ratio > 0.7) & (ratio < 1.3)).all(), ratio


def test_same_seed_same_result_and_other_seeds_agree():
    engine = engine_for(gentle("qwen3"), "qwen3")
    tokens = engine.tokenize([PROMPT])[0]
    first = estimate_scores(engine, tokens, ablation=Ablation(kind="sc"), config=EstimateConfig(estimator="sampled", seed=3))
    again = estimate_scores(engine, tokens, ablation=Ablation(kind="sc"), config=EstimateConfig(estimator="sampled", seed=3))
    assert torch.equal(first, again)
    other = estimate_scores(engine, tokens, ablation=Ablation(kind="sc"), config=EstimateConfig(estimator="sampled", seed=4))
    assert not torch.equal(first, other)
    # Two independent K=64 estimates: each score has ~18% relative noise.
    assert (other / first).log().abs().median() < math.log(1.5)
    assert spearman(first, other) > 0.8


def test_chunked_passes_equal_one_pass():
    """samples_per_pass splits the rows; each row keeps its draw, so only float rounding may differ."""
    engine = engine_for(gentle("gpt2"), "gpt2")
    tokens = engine.tokenize([PROMPT])[0]
    whole = estimate_scores(engine, tokens, ablation=Ablation(kind="ua"), config=EstimateConfig(estimator="sampled", samples=24))
    chunked = estimate_scores(engine, tokens, ablation=Ablation(kind="ua"),
                              config=EstimateConfig(estimator="sampled", samples=24, samples_per_pass=10))
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=0)


def test_one_forward_and_one_backward_pass():
    module = gentle("llama")
    engine = engine_for(module, "llama")
    tokens = engine.tokenize([PROMPT])[0]
    lm = engine.model.lm
    traces = []
    original_trace = lm.trace

    def counting_trace(*args, **kwargs):
        traces.append(kwargs["input_ids"].shape)
        return original_trace(*args, **kwargs)

    forwards, backwards = [], []
    first_layer = layer_part(module, engine.layout, 0, "self_attn")
    hooks = [
        first_layer.register_forward_hook(lambda m, args, output: forwards.append(1)),
        resolve(module, "lm_head").register_full_backward_hook(lambda m, grad_in, grad_out: backwards.append(1)),
    ]
    lm.trace = counting_trace
    try:
        estimate_scores(engine, tokens, ablation=Ablation(kind="ua"), config=EstimateConfig(estimator="sampled", samples=16))
    finally:
        del lm.trace
        for hook in hooks:
            hook.remove()
    assert traces == [torch.Size([16, len(tokens)])]  # one trace, K rows of the prompt
    assert len(forwards) == 1 and len(backwards) == 1


def test_weights_are_left_as_they_were():
    """No parameter gradient is computed or kept, trainable flags come back, and a frozen model works too."""
    module = gentle("gemma3_text")
    engine = engine_for(module, "gemma3_text")
    tokens = engine.tokenize([PROMPT])[0]
    module.requires_grad_(True)
    trainable = estimate_scores(engine, tokens, ablation=Ablation(kind="sc"), config=SAMPLED)
    assert all(p.requires_grad and p.grad is None for p in module.parameters())
    module.requires_grad_(False)  # as NDIF serves models
    frozen = estimate_scores(engine, tokens, ablation=Ablation(kind="sc"), config=SAMPLED)
    assert not any(p.requires_grad for p in module.parameters())
    torch.testing.assert_close(frozen, trainable)
    gc.collect()


def test_no_tensors_are_left_behind():
    """The reference cycle a backward trace leaves (nnsight.md section 4) is collected before returning."""
    engine = engine_for(gentle("llama"), "llama")
    tokens = engine.tokenize([PROMPT])[0]

    def live_tensors():
        with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated aliases warns
            warnings.simplefilter("ignore", FutureWarning)
            return sum(1 for thing in gc.get_objects() if isinstance(thing, torch.Tensor))

    estimate_scores(engine, tokens, ablation=Ablation(kind="ua"), config=EstimateConfig(estimator="sampled", samples=8))  # warm caches
    gc.collect()
    before = live_tensors()
    for _ in range(3):
        estimate_scores(engine, tokens, ablation=Ablation(kind="ua"), config=EstimateConfig(estimator="sampled", samples=8))
    assert live_tensors() == before


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(config=dict(samples=0)), "samples"),
        (dict(config=dict(samples_per_pass=0)), "samples-per-pass"),
        (dict(kind="zero"), "unknown ablation kind"),
        (dict(kind="mean"), "reference means"),
        (dict(kind="mean", means=torch.zeros(2, 64)), "means must be"),
        (dict(epsilon=2.0), "epsilon"),
    ],
)
def test_bad_input_is_a_user_error(settings, message):
    engine = engine_for(gentle("llama"), "llama")
    with pytest.raises(UserError, match=message):  # a bad config is refused where it is made
        ablation = Ablation(**{name: value for name, value in settings.items() if name != "config"})
        config = EstimateConfig(**settings["config"]) if "config" in settings else None
        estimate_scores(engine, engine.tokenize([PROMPT])[0], ablation=ablation, config=config)


def test_empty_prompt_is_a_user_error():
    engine = engine_for(gentle("llama"), "llama")
    with pytest.raises(UserError, match="empty"):
        estimate_scores(engine, [])


# -- the deterministic estimator (estimator="fisher", the default) ----------------------------------------------------

# Spearman(estimate, exact) over the 12 heads, top_tokens 8, measured (model seed 0): gentle (std 0.1) sc llama 0.83,
# qwen3 0.90, gemma3_text 0.76, gpt2 0.85, phi3 0.90; ua 0.95, 0.90, 0.94, 0.99, 1.00. Strong (std 0.3): sc 0.87,
# 0.85, 0.87, 0.97, 0.93; ua 0.92, 0.94, 0.82, 0.97, 0.92. On the gentle models the next-token distribution is nearly
# flat over 259 tokens, so 8 top tokens and a lumped rest hold little of its variance (the sizes come out ~8x small);
# a trained model's next token is far more peaked. ua, the case the sampled estimator linearises badly, is where
# this one gains: its changes are exact.
FISHER_FLOOR = {"sc": 0.7, "ua": 0.8}


@pytest.mark.parametrize("strong", [False, True])
@pytest.mark.parametrize("kind", ["sc", "ua"])
@pytest.mark.parametrize("name", FIVE)
def test_fisher_estimate_ranks_heads_like_exact(name, kind, strong):
    module = FAMILIES[name].build() if strong else gentle(name)
    engine = engine_for(module, name)
    tokens = engine.tokenize([PROMPT])[0]
    estimate = estimate_scores(engine, tokens, ablation=Ablation(kind=kind))  # the default estimator
    check_shape_and_sign(estimate, engine)
    rho = spearman(estimate, exact_scores(engine, tokens, kind))
    assert rho >= FISHER_FLOOR[kind], f"{name} {kind}: Spearman {rho:.3f}"


@pytest.mark.parametrize("kind", ["sc", "ua", "mean"])
def test_fisher_estimate_is_the_exact_quadratic_form_for_small_ablations(kind):
    """Every token backpropagated (nothing lumped) and a 10% ablation: the estimate is the second-order expansion
    of the KL itself, so it matches the exact KL in size, head by head. This pins the 1/2, the exact per-layer
    changes (for ua too: no linearised softmax) and the Fisher's centring."""
    engine = engine_for(gentle("llama"), "llama")
    tokens = engine.tokenize([PROMPT])[0]
    means = engine.head_means(REFERENCE) if kind == "mean" else None
    epsilon = 0.9 if kind != "mean" else 1e-4
    vocabulary = engine.model.module.config.vocab_size
    estimate = estimate_scores(engine, tokens, ablation=Ablation(kind=kind, epsilon=epsilon, means=means),
                               config=EstimateConfig(top_tokens=vocabulary - 1))
    ratio = (estimate / exact_scores(engine, tokens, kind, epsilon=epsilon, means=means)).flatten()
    if kind == "mean":  # a full replacement is not small: the ranking is what is promised
        assert spearman(estimate, exact_scores(engine, tokens, kind, means=means)) >= 0.9
    else:
        assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio


def test_layer_deltas_are_the_exact_change_of_each_head():
    """For ua the change at the output site is computed, not linearised: it equals (ablated - clean) head outputs
    of a plain forward pass with that one head's query scaled, at every position."""
    from safety_heads import intrace

    family = FAMILIES["qwen2"]
    module = family.build()
    engine = engine_for(module, "qwen2")
    tokens = engine.tokenize([PROMPT])[0]
    batch = engine.batch([tokens], [0])
    deltas = intrace.layer_deltas(engine.model.lm, engine.sites, batch.repeated(1), Ablation(kind="ua").in_trace(None),
                                  save=nnsight.save)
    d = family.head_dim
    for layer, head in [(0, 1), (1, 3), (2, 0)]:
        captured = {}
        attention = module.model.layers[layer].self_attn

        def scale(m, args, out, head=head):
            out = out.clone()
            out[..., head * d:(head + 1) * d] *= 1e-4
            return out

        def keep(m, args, key, captured=captured):
            captured[key] = args[0][0].detach().clone()

        with torch.no_grad():
            hook = attention.o_proj.register_forward_pre_hook(lambda m, a: keep(m, a, "clean"))
            module(input_ids=torch.tensor([tokens]), use_cache=False)
            hook.remove()
            hooks = [attention.q_proj.register_forward_hook(scale),
                     attention.o_proj.register_forward_pre_hook(lambda m, a: keep(m, a, "ablated"))]
            module(input_ids=torch.tensor([tokens]), use_cache=False)
            for h in hooks:
                h.remove()
        expected = (captured["ablated"] - captured["clean"])[:, head * d:(head + 1) * d]
        got = deltas[layer][:, head * d:(head + 1) * d]
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_fisher_estimate_is_deterministic_and_travels():
    engine = engine_for(gentle("qwen3"), "qwen3")
    tokens = engine.tokenize([PROMPT])[0]
    first = estimate_scores(engine, tokens, ablation=Ablation(kind="ua"))
    assert torch.equal(first, estimate_scores(engine, tokens, ablation=Ablation(kind="ua")))
    from safety_heads.engine import EngineConfig

    simulated = estimate_scores(Engine(engine.model, EngineConfig(remote="local")), tokens, ablation=Ablation(kind="ua"))
    torch.testing.assert_close(simulated, first, rtol=1e-6, atol=0)


def test_fisher_estimate_costs_two_traces_of_few_rows():
    engine = engine_for(gentle("llama"), "llama")
    tokens = engine.tokenize([PROMPT])[0]
    lm = engine.model.lm
    shapes = []
    original_trace = lm.trace

    def counting_trace(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return original_trace(*args, **kwargs)

    lm.trace = counting_trace
    try:
        estimate_scores(engine, tokens, ablation=Ablation(kind="ua"), config=EstimateConfig(top_tokens=5))
    finally:
        del lm.trace
    assert shapes == [(2, len(tokens)), (6, len(tokens))]  # the per-layer changes, then 5 tokens + the rest


@pytest.mark.parametrize("settings, message", [
    (dict(config=dict(top_tokens=0)), "top-tokens"),
    (dict(config=dict(estimator="guess")), "unknown estimator"),
])
def test_bad_fisher_settings_are_user_errors(settings, message):
    engine = engine_for(gentle("llama"), "llama")
    with pytest.raises(UserError, match=message):  # a bad config is refused where it is made
        ablation = Ablation(**{name: value for name, value in settings.items() if name != "config"})
        config = EstimateConfig(**settings["config"]) if "config" in settings else None
        estimate_scores(engine, engine.tokenize([PROMPT])[0], ablation=ablation, config=config)
