"""Ablated generation against generation from a surgically edited model, logits compared at every step."""

import copy

import pytest
import torch
from devices import relative_tolerance
from families import FAMILIES

from safety_heads.ablation import Ablation, bake_into_weights
from safety_heads.errors import UserError
from safety_heads.generate import GenerationConfig, generate
from safety_heads.models import wrap
from safety_heads.tiny import byte_tokenizer

PROMPTS = ["How do I pick a lock?", "Hi", "Tell me a story about a dragon and a knight."]
HEADS = [(0, 1), (1, 3), (2, 0)]


def tokens(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.mark.parametrize("kind", ["ua", "sc"])
@pytest.mark.parametrize("family_name", ["llama", "qwen2", "gpt2", "phi3"])
def test_ablated_generation_equals_surgery(family_name, kind):
    module = FAMILIES[family_name].build()
    tokenizer = byte_tokenizer()
    model = wrap(module, tokenizer, family_name)
    config = GenerationConfig(max_new_tokens=6, batch_size=3)
    ablated = generate(model, tokens(tokenizer), head_sets=[HEADS] * 3, ablation=Ablation(kind=kind), config=config, keep_logits=True)
    edited = copy.deepcopy(module)
    bake_into_weights(edited, model.layout, Ablation(tuple(HEADS), kind, 1e-4))
    baked = generate(wrap(edited, byte_tokenizer(), "edited"), tokens(tokenizer), config=config, keep_logits=True)
    clean = generate(model, tokens(tokenizer), config=config, keep_logits=True)
    for a, b, c in zip(ablated, baked, clean):
        assert a.token_ids == b.token_ids
        assert a.logits.shape[0] == len(a.token_ids) >= 1
        scale = b.logits.abs().max()
        assert ((a.logits - b.logits).abs().max() / scale) <= relative_tolerance()  # every step, not only the first
        assert ((a.logits - c.logits).abs().max() / scale) > 1e-3  # the ablation matters at every step
        assert ((a.logits[-1] - c.logits[-1]).abs().max() / scale) > 1e-4


def test_batched_left_padded_equals_one_at_a_time():
    tokenizer = byte_tokenizer()
    model = wrap(FAMILIES["llama"].build(), tokenizer, "llama")
    config = GenerationConfig(max_new_tokens=5, batch_size=3)
    together = generate(model, tokens(tokenizer), head_sets=[HEADS, [], [(2, 2)]], config=config, keep_logits=True)
    for row, heads in enumerate([HEADS, [], [(2, 2)]]):
        alone = generate(model, [tokens(tokenizer)[row]], head_sets=[heads], config=config, keep_logits=True)[0]
        assert alone.token_ids == together[row].token_ids
        assert ((alone.logits - together[row].logits).abs().max() / alone.logits.abs().max()) <= relative_tolerance()


def test_sampling_is_reproducible_with_a_seed():
    tokenizer = byte_tokenizer()
    model = wrap(FAMILIES["llama"].build(), tokenizer, "llama")
    config = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=5, seed=7)
    first = [g.token_ids for g in generate(model, tokens(tokenizer), config=config)]
    second = [g.token_ids for g in generate(model, tokens(tokenizer), config=config)]
    sampled = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=5, seed=8)
    other = [g.token_ids for g in generate(model, tokens(tokenizer), config=sampled)]
    assert first == second and first != other


def test_generation_stops_at_end_of_sequence():
    tokenizer = byte_tokenizer()
    module = FAMILIES["llama"].build()
    with torch.no_grad():  # make </s> (id 257) the only sensible next token
        module.lm_head.weight[257] = 0
        module.lm_head.bias = None
        module.lm_head.weight.data[257] += 1e3 * module.model.norm.weight.sign()
    model = wrap(module, tokenizer, "llama")
    result = generate(model, tokens(tokenizer), config=GenerationConfig(max_new_tokens=6))
    assert all(g.token_ids == [] and g.text == "" for g in result)


@pytest.mark.parametrize(
    "settings, message",
    [(dict(max_new_tokens=0), "--max-new-tokens"), (dict(batch_size=0), "--batch-size"),
     (dict(top_p=1.5), "--top-p"), (dict(temperature=0), "--temperature")],
)
def test_bad_generation_settings(settings, message):
    tokenizer = byte_tokenizer()
    model = wrap(FAMILIES["llama"].build(), tokenizer, "llama")
    with pytest.raises(UserError, match=message):  # refused where the config is made
        generate(model, tokens(tokenizer), config=GenerationConfig(**settings))
