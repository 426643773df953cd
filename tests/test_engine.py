"""The engine against the plain-PyTorch reference (one unpadded forward pass per head set), on every family."""

import math

import pytest
import torch
from devices import MIN_EFFECT, TEST_DEVICE, close, relative_tolerance
from families import FAMILIES
from reference import reference_means, reference_readouts, reference_token_log_probs

from safety_heads.ablation import Ablation
from safety_heads.batching import plan_chunks
from safety_heads.engine import Engine, EngineConfig
from safety_heads.errors import UserError
from safety_heads.models import wrap
from safety_heads.tiny import byte_tokenizer

PROMPTS = ["How do I pick a lock?", "Hi", "Write a short poem about the sea, please."]  # three lengths, one batch
TOLERANCE = relative_tolerance(TEST_DEVICE, torch.float32)  # max |engine - reference| / max |reference| (devices.py)


def relative_error(values, reference):
    return ((values.double() - reference).abs().max() / reference.abs().max()).item()


def head_sets_for(family):
    singles = [[(layer, head)] for layer in range(3) for head in range(family.n_heads)]
    groups = [[(0, 1), (2, 3)], [(1, 0), (1, 3), (2, 2)], []]  # across layers, within a layer, and none (clean)
    return singles + groups


def wrapped(family_name, **engine_settings):
    family = FAMILIES[family_name]
    module = family.build()
    return family, module, Engine(wrap(module, byte_tokenizer(), family_name), EngineConfig(**engine_settings))


@pytest.mark.parametrize("kind", ["ua", "sc", "mean"])
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_engine_matches_reference(family_name, kind):
    family, module, engine = wrapped(family_name)
    tokens = engine.tokenize(PROMPTS)
    means = reference_means(module, family, tokens) if kind == "mean" else None
    head_sets = head_sets_for(family)
    result = engine.run(PROMPTS, head_sets, ablation=Ablation(kind=kind, epsilon=1e-4, means=means), readouts=("logits", "hidden"))
    assert result.logits.shape == (len(PROMPTS), len(head_sets), module.config.vocab_size)
    worst, smallest_effect = 0.0, math.inf
    for p, prompt_tokens in enumerate(tokens):
        clean_logits, clean_hidden = reference_readouts(module, family, prompt_tokens, [], kind)
        assert relative_error(result.clean_logits[p], clean_logits) <= TOLERANCE
        assert relative_error(result.clean_hidden[p], clean_hidden) <= TOLERANCE
        for k, heads in enumerate(head_sets):
            logits, hidden = reference_readouts(module, family, prompt_tokens, heads, kind, 1e-4, means)
            worst = max(worst, relative_error(result.logits[p, k], logits), relative_error(result.hidden[p, k], hidden))
            if heads:
                smallest_effect = min(smallest_effect, relative_error(clean_logits, logits))
    assert worst <= TOLERANCE, f"max relative error {worst:.2e}"
    # The comparison can only catch a wrong head if every ablation moves the logits far more than the tolerance.
    assert smallest_effect > MIN_EFFECT, f"an ablation barely changed the logits ({smallest_effect:.1e})"


def test_gqa_is_exercised():
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"):
        config = FAMILIES[name].build().config
        assert config.num_key_value_heads < config.num_attention_heads, name


@pytest.mark.parametrize("settings", [dict(prefix_reuse=False), dict(max_batch_rows=1), dict(max_batch_rows=7), dict(memory_budget_mb=0.5)])
def test_batching_choices_do_not_change_results(settings):
    family, module, engine = wrapped("llama")
    head_sets = head_sets_for(family)
    expected = engine.run(PROMPTS, head_sets, readouts=("logits", "hidden"))
    other = Engine(engine.model, EngineConfig(**settings)).run(PROMPTS, head_sets, readouts=("logits", "hidden"))
    torch.testing.assert_close(other.logits, expected.logits, **close())
    torch.testing.assert_close(other.hidden, expected.hidden, **close())
    if settings.get("max_batch_rows") == 1:
        assert other.stats["traces"] == len(PROMPTS) * (1 + len(head_sets) - 1)  # a clean pass per prompt + one per set


def test_prefix_reuse_skips_layers():
    family, module, engine = wrapped("llama", prefix_reuse=True)
    engine.model  # noqa: B018
    sets = [[(2, h)] for h in range(family.n_heads)]
    stats = {}
    list(engine.stream(["abc"], sets, stats=stats))
    no_reuse = {}
    list(Engine(engine.model, EngineConfig(prefix_reuse=False)).stream(["abc"], sets, stats=no_reuse))
    # Every set starts at layer 2 of 3, so each ablated row needs one layer instead of three.
    assert stats["layer_rows"] - 3 == (no_reuse["layer_rows"] - 3) // 3


def test_head_means_match_reference():
    family, module, engine = wrapped("qwen2")
    tokens = engine.tokenize(PROMPTS)
    torch.testing.assert_close(engine.head_means(PROMPTS), reference_means(module, family, tokens), rtol=TOLERANCE, atol=TOLERANCE / 10)


@pytest.mark.parametrize("family_name", ["llama", "gemma2", "gpt2"])
def test_token_log_probs_match_one_unpadded_pass_each(family_name):
    """Left-padded, length-grouped batches (and several of them, by a tiny memory budget) give each sequence's own
    log-probabilities, as one plain forward pass of the module on that sequence alone."""
    family, module, engine = wrapped(family_name, memory_budget_mb=0.05)
    tokens = engine.tokenize(PROMPTS + ["x" * 30])
    result = engine.token_log_probs(tokens)
    for ids, values in zip(tokens, result):
        with torch.no_grad():
            log_probs = torch.log_softmax(module(torch.tensor([ids], device=TEST_DEVICE)).logits[0].double().cpu(), dim=-1)
        reference = log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert values.shape == (len(ids) - 1,)
        assert relative_error(values, reference) < TOLERANCE


def test_token_log_probs_in_remote_simulation_equal_local():
    family, module, engine = wrapped("llama")
    local = engine.token_log_probs(engine.tokenize(PROMPTS))
    simulated = Engine(engine.model, EngineConfig(remote="local")).token_log_probs(engine.tokenize(PROMPTS))
    assert all(torch.equal(a, b) for a, b in zip(local, simulated))


@pytest.mark.parametrize("kind", ["ua", "sc", "mean"])
@pytest.mark.parametrize("family_name", ["llama", "phi3", "gpt2"])
def test_ablated_token_log_probs_match_reference(family_name, kind):
    """Each sequence's last `last` tokens, teacher-forced, under each head set: as one plain hooked pass per (sequence,
    set). Several batches and set chunks (a tiny budget); "Hi" is shorter than `last` + 1, so its head is NaN."""
    family, module, engine = wrapped(family_name, memory_budget_mb=0.05)
    tokens = engine.tokenize(PROMPTS + ["x" * 30])
    means = reference_means(module, family, tokens) if kind == "mean" else None
    head_sets = [[], [(0, 1)], [(0, 1), (2, 3)], [(1, 0), (1, 2)]]
    last = 5
    result = engine.ablated_token_log_probs(tokens, head_sets, last, ablation=Ablation(kind=kind, epsilon=1e-4, means=means))
    assert result.shape == (len(head_sets), len(tokens), last)
    worst, smallest_effect = 0.0, math.inf
    for s, heads in enumerate(head_sets):
        for p, ids in enumerate(tokens):
            reference = reference_token_log_probs(module, family, ids, heads, kind, 1e-4, means)[-last:]
            values = result[s, p]
            missing = last - len(reference)
            assert torch.isnan(values[:missing]).all() and not torch.isnan(values[missing:]).any()
            worst = max(worst, relative_error(values[missing:], reference))
            if heads:
                clean = reference_token_log_probs(module, family, ids, [], kind)[-last:]
                smallest_effect = min(smallest_effect, relative_error(clean, reference))
    assert worst <= TOLERANCE, f"max relative error {worst:.2e}"
    assert smallest_effect > MIN_EFFECT


def test_ablated_token_log_probs_in_remote_simulation_equal_local():
    family, module, engine = wrapped("llama")
    tokens = engine.tokenize(PROMPTS)
    sets = [[], [(0, 1)], [(1, 0), (2, 3)]]
    local = engine.ablated_token_log_probs(tokens, sets, 4)
    simulated = Engine(engine.model, EngineConfig(remote="local")).ablated_token_log_probs(tokens, sets, 4)
    assert torch.equal(local.isnan(), simulated.isnan())
    assert torch.equal(local.nan_to_num(), simulated.nan_to_num())


def test_token_id_prompts_equal_string_prompts():
    family, module, engine = wrapped("llama")
    tokens = engine.tokenize(PROMPTS)
    a = engine.run(PROMPTS, [[(1, 1)]])
    b = engine.run(tokens, [[(1, 1)]])
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.run([], [[(0, 0)]]), "no prompts"),
        (lambda e: e.run(["x" * 500], [[(0, 0)]]), "beyond the model's context"),
        (lambda e: e.run(["hi"], [[(3, 0)]]), "layer 3 is out of range"),
        (lambda e: e.run(["hi"], [[(0, 4)]]), "head 4 is out of range"),
        (lambda e: e.run(["hi"], [[(0, 0)]], ablation=Ablation(epsilon=-1.0)), "epsilon"),
        (lambda e: e.run(["hi"], [[(0, 0)]], ablation=Ablation(epsilon=float("nan"))), "epsilon"),
        (lambda e: e.run(["hi"], [[(0, 0)]], ablation=Ablation(kind="zero")), "unknown ablation kind"),
        (lambda e: e.run(["hi"], [[(0, 0)]], ablation=Ablation(kind="mean")), "reference means"),
    ],
)
def test_bad_input_is_a_user_error(call, message):
    _, _, engine = wrapped("llama")
    with pytest.raises(UserError, match=message):
        call(engine)


def test_non_finite_outputs_name_the_place():
    family, module, engine = wrapped("llama")
    with torch.no_grad():
        module.lm_head.weight.fill_(3e38)
    with pytest.raises(UserError, match="clean model produced non-finite values after the last layer"):
        engine.run(["hello"], [[(0, 0)]])


def test_float16_overflow_names_the_layer():
    family, module, engine = wrapped("llama")
    with torch.no_grad():
        module.model.layers[1].mlp.down_proj.weight.mul_(1e4)  # layer 1's output overflows float16
    half = Engine(wrap(module.half(), byte_tokenizer(), "llama"))
    with pytest.raises(UserError, match=r"non-finite values from layer 1 on \(overflow in float16\?\); rerun with --dtype float32"):
        half.run(["hello there"], [[(0, 0)]])


def test_non_finite_only_after_ablation_is_reported_for_the_ablated_model():
    family, module, engine = wrapped("llama")
    means = torch.full((3, 64), float("inf"))
    with pytest.raises(UserError, match="an ablated model produced non-finite values from layer 2 on"):
        engine.run(["hello"], [[(2, 1)]], ablation=Ablation(kind="mean", means=means))


class TestPlanChunks:
    def covers(self, chunks, first_layers, max_sets, reuse=True):
        seen = sorted(i for chunk in chunks for i in chunk.set_indices)
        assert seen == list(range(len(first_layers)))
        for chunk in chunks:
            assert len(chunk.set_indices) <= max_sets
            assert chunk.start_layer == (min(first_layers[i] for i in chunk.set_indices) if reuse else 0)

    def test_expensive_traces_merge_everything(self):
        first = [l for l in range(4) for _ in range(8)]
        chunks = plan_chunks(first, 4, 1, 100, overhead_layer_rows=1e6)
        assert len(chunks) == 1 and chunks[0].start_layer == 0
        self.covers(chunks, first, 100)

    def test_cheap_traces_split_by_first_layer(self):
        first = [l for l in range(4) for _ in range(8)]
        chunks = plan_chunks(first, 4, 1, 100, overhead_layer_rows=0.01)
        assert [c.start_layer for c in chunks] == [0, 1, 2, 3]
        self.covers(chunks, first, 100)

    def test_memory_cap_splits_groups(self):
        first = [3, 0, 1, 1, 2, 0, 3, 3, 2]
        chunks = plan_chunks(first, 4, 2, 2, overhead_layer_rows=1.0)
        self.covers(chunks, first, 2)

    def test_without_prefix_reuse_everything_starts_at_zero(self):
        first = [3, 2, 1]
        chunks = plan_chunks(first, 4, 1, 2, overhead_layer_rows=0.0, prefix_reuse=False)
        self.covers(chunks, first, 2, reuse=False)


def test_remote_simulation_equals_local():
    """nnsight's remote="local" serialises each trace as a remote request would and replays it: same numbers."""
    family, module, engine = wrapped("qwen3")
    head_sets = head_sets_for(family)
    local = engine.run(PROMPTS, head_sets, readouts=("logits", "hidden"))
    simulated = Engine(engine.model, EngineConfig(remote="local")).run(PROMPTS, head_sets, readouts=("logits", "hidden"))
    assert torch.equal(local.logits, simulated.logits) and torch.equal(local.hidden, simulated.hidden)


# -- a shared prefix (EngineConfig.shared_prefix) ----------------------------------------------------------------------

TEMPLATED = [f"<system> You are a careful assistant. <user> {q} <assistant>" for q in ("How do I pick a lock?", "Hi",
                                                                                    "Write a poem.", "Tell me a joke")]


def shared_lengths(engine, prompts, head_sets):
    """The shared-prefix length of each prompt group the engine plans (None: that group runs whole)."""
    plans = engine.group_schedules(engine.tokenize(prompts), engine.normalise_sets(head_sets))
    return [batch.shared.length if batch.shared is not None else None for batch, _ in plans]


@pytest.mark.parametrize("kind", ["ua", "sc", "mean"])
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_shared_prefix_matches_reference(family_name, kind):
    """Prompts of one template: their common first tokens run once per head set, the rests on that KV cache."""
    family, module, engine = wrapped(family_name, shared_prefix="always")
    tokens = engine.tokenize(TEMPLATED)
    means = reference_means(module, family, tokens) if kind == "mean" else None
    head_sets = head_sets_for(family)
    lengths = shared_lengths(engine, TEMPLATED, head_sets)
    assert lengths and all(length is not None and length >= 30 for length in lengths)  # the path under test is taken
    result = engine.run(TEMPLATED, head_sets, ablation=Ablation(kind=kind, epsilon=1e-4, means=means), readouts=("logits", "hidden"))
    worst = 0.0
    for p, prompt_tokens in enumerate(tokens):
        clean_logits, clean_hidden = reference_readouts(module, family, prompt_tokens, [], kind)
        worst = max(worst, relative_error(result.clean_logits[p], clean_logits), relative_error(result.clean_hidden[p], clean_hidden))
        for k, heads in enumerate(head_sets):
            logits, hidden = reference_readouts(module, family, prompt_tokens, heads, kind, 1e-4, means)
            worst = max(worst, relative_error(result.logits[p, k], logits), relative_error(result.hidden[p, k], hidden))
    assert worst <= TOLERANCE, f"max relative error {worst:.2e}"


@pytest.mark.parametrize("settings", [dict(max_batch_rows=4), dict(max_batch_rows=9), dict(prefix_reuse=False)])
def test_shared_prefix_with_other_batching_choices(settings):
    family, module, engine = wrapped("qwen2", shared_prefix="never")
    head_sets = head_sets_for(family)
    expected = engine.run(TEMPLATED, head_sets, readouts=("logits", "hidden"))
    shared = Engine(engine.model, EngineConfig(shared_prefix="always", **settings))
    assert all(length is not None for length in shared_lengths(shared, TEMPLATED, head_sets))
    other = shared.run(TEMPLATED, head_sets, readouts=("logits", "hidden"))
    torch.testing.assert_close(other.logits, expected.logits, **close())
    torch.testing.assert_close(other.hidden, expected.hidden, **close())


def test_shared_prefix_needs_two_prompts_and_a_common_start():
    family, module, engine = wrapped("llama", shared_prefix="always")
    sets = [[(0, 0)]]
    assert shared_lengths(engine, TEMPLATED[:1], sets) == [None]  # one prompt: nothing to share
    assert shared_lengths(Engine(engine.model, EngineConfig(shared_prefix="never")), TEMPLATED, sets) == [None]
    assert shared_lengths(engine, ["abc", "xyz"], sets) == [None]  # at most the start token in common


def test_common_prefix_leaves_every_prompt_a_token():
    from safety_heads.batching import common_prefix_length

    assert common_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix_length([[1, 2], [1, 2, 3]]) == 1  # the shorter prompt keeps its last token
    assert common_prefix_length([[5, 2], [1, 2]]) == 0


def test_shared_prefix_auto_is_taken_only_when_it_pays():
    """On the tiny model a trace costs more than the few positions saved; with free traces it pays."""
    family, module, engine = wrapped("llama")  # auto
    head_sets = head_sets_for(family)
    assert shared_lengths(engine, TEMPLATED, head_sets) == [None]
    engine.overhead_layer_rows = lambda length: 0.0
    assert all(length is not None for length in shared_lengths(engine, TEMPLATED, head_sets))


def test_shared_prefix_in_remote_simulation_equals_local():
    family, module, engine = wrapped("qwen3", shared_prefix="always")
    head_sets = head_sets_for(family)
    local = engine.run(TEMPLATED, head_sets, readouts=("logits", "hidden"))
    simulated = Engine(engine.model, EngineConfig(remote="local", shared_prefix="always"))
    assert all(length is not None for length in shared_lengths(simulated, TEMPLATED, head_sets))
    result = simulated.run(TEMPLATED, head_sets, readouts=("logits", "hidden"))
    assert torch.equal(local.logits, result.logits) and torch.equal(local.hidden, result.hidden)


# -- base reuse: heads every set ablates (a Sahara step's group) --------------------------------------------------------


def grouped_sets(family):
    """Every set holds the group (0, 1) and one more head, as in Sahara's second step."""
    return [[(0, 1), (layer, head)] for layer in range(3) for head in range(family.n_heads) if (layer, head) != (0, 1)]


@pytest.mark.parametrize("shared", ["never", "always"])
@pytest.mark.parametrize("kind", ["ua", "sc", "mean"])
@pytest.mark.parametrize("family_name", ["llama", "qwen3", "gemma2", "phi3", "gpt2"])
def test_sets_with_common_heads_match_reference(family_name, kind, shared):
    family, module, engine = wrapped(family_name, shared_prefix=shared)
    engine.overhead_layer_rows = lambda length: 0.0  # free traces: a chunk per first layer, as on a large model
    prompts = TEMPLATED if shared == "always" else PROMPTS
    tokens = engine.tokenize(prompts)
    means = reference_means(module, family, tokens) if kind == "mean" else None
    head_sets = grouped_sets(family)
    plans = engine.group_schedules(tokens, engine.normalise_sets(head_sets))
    assert all(batch.base == ((0, 1),) for batch, _ in plans)
    assert any(chunk.start_layer > 0 for _, chunks in plans for chunk in chunks)  # reuse above the group's layer
    result = engine.run(prompts, head_sets, ablation=Ablation(kind=kind, epsilon=1e-4, means=means), readouts=("logits", "hidden"))
    worst = 0.0
    for p, prompt_tokens in enumerate(tokens):
        clean_logits, _ = reference_readouts(module, family, prompt_tokens, [], kind)
        worst = max(worst, relative_error(result.clean_logits[p], clean_logits))  # the clean readouts stay clean
        for k, heads in enumerate(head_sets):
            logits, hidden = reference_readouts(module, family, prompt_tokens, heads, kind, 1e-4, means)
            worst = max(worst, relative_error(result.logits[p, k], logits), relative_error(result.hidden[p, k], hidden))
    assert worst <= TOLERANCE, f"max relative error {worst:.2e}"


def test_common_heads_cut_layer_evaluations():
    family, module, engine = wrapped("llama")
    sets = [[(0, 1), (2, head)] for head in range(family.n_heads)]
    stats, without = {}, {}
    list(engine.stream(["abc"], sets, stats=stats))
    list(Engine(engine.model, EngineConfig(prefix_reuse=False)).stream(["abc"], sets, stats=without))
    # Every set's own head is in layer 2 of 3: one layer per ablated row instead of three, plus a base pass.
    assert stats["layer_rows"] - 2 * 3 == (without["layer_rows"] - 3) // 3


def test_common_heads_in_remote_simulation_equal_local():
    family, module, engine = wrapped("qwen3", shared_prefix="always")
    engine.overhead_layer_rows = lambda length: 0.0
    head_sets = grouped_sets(family)
    local = engine.run(TEMPLATED, head_sets, readouts=("logits", "hidden"))
    simulated = Engine(engine.model, EngineConfig(remote="local", shared_prefix="always"))
    simulated.overhead_layer_rows = lambda length: 0.0
    result = simulated.run(TEMPLATED, head_sets, readouts=("logits", "hidden"))
    assert torch.equal(local.logits, result.logits) and torch.equal(local.hidden, result.hidden)
    engines = [Engine(engine.model, EngineConfig(remote=remote, shared_prefix="never")) for remote in ("local", False)]
    for other in engines:
        other.overhead_layer_rows = lambda length: 0.0
    plain, here = (other.run(PROMPTS, head_sets, readouts=("logits",)) for other in engines)
    assert torch.equal(plain.logits, here.logits)
