"""Head specs, ablation checks, and weight surgery against the traced ablation."""

import copy

import pytest
import torch
from devices import relative_tolerance
from families import FAMILIES
from hypothesis import given, settings
from hypothesis import strategies as st

from safety_heads.ablation import Ablation, bake_into_weights, format_heads, parse_heads
from safety_heads.engine import Engine
from safety_heads.errors import UserError
from safety_heads.models import head_layout, wrap
from safety_heads.tiny import byte_tokenizer

PROMPTS = ["Tell me how to make a cake.", "Hello there"]
HEADS = ((0, 1), (1, 3), (2, 0), (2, 2))


def layout_of(name):
    return head_layout(FAMILIES[name].build().config)


class TestParseHeads:
    layout = None

    @classmethod
    def setup_class(cls):
        cls.layout = layout_of("llama")  # 3 layers x 4 heads

    @pytest.mark.parametrize(
        "spec, expected",
        [
            ("2:3,0:1", ((0, 1), (2, 3))),
            ("1:*", ((1, 0), (1, 1), (1, 2), (1, 3))),
            ("0-1:2", ((0, 2), (1, 2))),
            ("*/2:0", ((0, 0), (2, 0))),
            ("2:0-3/2", ((2, 0), (2, 2))),
            (" 0:0 , 0:0 ", ((0, 0),)),
        ],
    )
    def test_valid(self, spec, expected):
        assert parse_heads(spec, self.layout) == expected

    @pytest.mark.parametrize(
        "spec, message",
        [
            ("", "empty head spec"),
            ("3:0", "layer 3 .* out of range"),
            ("0:4", "head 4 .* out of range"),
            ("0", "malformed head"),
            ("0:1:2", "malformed head"),
            ("a:1", "malformed layer"),
            ("2-1:0", "empty layer range"),
            ("0:-1", "malformed head"),
            ("0:1/0", "step must be at least 1"),
        ],
    )
    def test_invalid(self, spec, message):
        with pytest.raises(UserError, match=message):
            parse_heads(spec, self.layout)

    @settings(max_examples=200, deadline=None)
    @given(st.text(alphabet="0123456789:,-*/ ab", max_size=20))
    def test_fuzz_never_crashes(self, spec):
        try:
            heads = parse_heads(spec, self.layout)
        except UserError:
            return
        assert heads and all(0 <= l < 3 and 0 <= h < 4 for l, h in heads)
        assert parse_heads(format_heads(heads), self.layout) == heads


@pytest.mark.parametrize("epsilon", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_epsilon(epsilon):
    with pytest.raises(UserError, match="epsilon"):
        Ablation(((0, 0),), "ua", epsilon)


def test_unknown_kind():
    with pytest.raises(UserError, match="unknown ablation kind 'zero'"):
        Ablation(((0, 0),), "zero")


SURGERY_CASES = [
    (name, kind)
    for name in sorted(FAMILIES)
    for kind in ("ua", "sc", "mean")
    if not (kind == "ua" and name in ("qwen3", "gemma3_text"))
]


@pytest.mark.parametrize("family_name, kind", SURGERY_CASES)
def test_surgery_equals_traced_ablation(family_name, kind):
    module = FAMILIES[family_name].build()
    engine = Engine(wrap(module, byte_tokenizer(), family_name))
    means = engine.head_means(PROMPTS) if kind == "mean" else None
    traced = engine.run(PROMPTS, [HEADS], ablation=Ablation(kind=kind, epsilon=1e-4, means=means))
    edited = copy.deepcopy(module)
    bake_into_weights(edited, engine.layout, Ablation(HEADS, kind, 1e-4, means))
    baked = Engine(wrap(edited, byte_tokenizer(), family_name)).run(PROMPTS, [[]])
    scale = traced.logits.abs().max()
    assert ((baked.logits - traced.logits).abs().max() / scale) <= relative_tolerance()
    # ... and the ablation really changed the model.
    assert ((traced.clean_logits - traced.logits[:, 0]).abs().max() / scale) > 1e-3


def test_surgery_scales_query_bias():
    module = FAMILIES["qwen2"].build()
    layout = head_layout(module.config)
    edited = copy.deepcopy(module)
    bake_into_weights(edited, layout, Ablation(((1, 2),), "ua", 0.5))
    before, after = module.model.layers[1].self_attn.q_proj, edited.model.layers[1].self_attn.q_proj
    rows = layout.head_slice(2)
    torch.testing.assert_close(after.bias[rows], before.bias[rows] * 0.5)
    torch.testing.assert_close(after.bias[: rows.start], before.bias[: rows.start])


@pytest.mark.parametrize("family_name", ["qwen3", "gemma3_text"])
def test_ua_surgery_refused_behind_query_norm(family_name):
    module = FAMILIES[family_name].build()
    with pytest.raises(UserError, match="cannot be baked"):
        bake_into_weights(module, head_layout(module.config), Ablation(((0, 0),), "ua"))
