"""Head layouts for every family (safety_heads/layout.py): each adapter's sites exist and have the sizes it claims."""

import pytest
import torch
import transformers
from families import FAMILIES

from safety_heads.errors import UserError
from safety_heads.layout import FAMILIES as REGISTRY
from safety_heads.layout import head_layout, layer_part, resolve


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_layout_matches_the_model(family_name):
    family = FAMILIES[family_name]
    module = family.build()
    layout = head_layout(module.config)
    assert (layout.n_heads, layout.head_dim) == (family.n_heads, family.head_dim)
    assert layout.n_layers == 3
    assert len(resolve(module, layout.layers_path)) == layout.n_layers
    # The sites exist and have the sizes the layout claims.
    seen = {}
    query = layer_part(module, layout, 1, layout.query_path)
    output = layer_part(module, layout, 1, layout.output_path)
    hooks = [
        query.register_forward_hook(lambda m, a, o: seen.__setitem__("query", o.shape)),
        output.register_forward_pre_hook(lambda m, a: seen.__setitem__("output", a[0].shape)),
    ]
    with torch.no_grad():
        module(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
    for hook in hooks:
        hook.remove()
    assert seen["output"][-1] == layout.n_heads * layout.head_dim
    if layout.query_axes == "flat":
        assert seen["query"][-1] >= layout.query_offset + layout.n_heads * layout.head_dim
    elif layout.query_axes == "bshd":
        assert seen["query"] == (1, 5, layout.n_heads, layout.head_dim)
    else:
        assert seen["query"] == (1, layout.n_heads, 5, layout.head_dim)


def test_head_dim_comes_from_the_config():
    layout = head_layout(FAMILIES["qwen3"].build().config)
    assert layout.head_dim == 24 != 64 // 4


def test_gqa_counts():
    layout = head_layout(FAMILIES["mistral"].build().config)
    assert (layout.n_heads, layout.n_kv_heads, layout.n_rep) == (4, 2, 2)


def test_every_registered_family_is_tested():
    assert set(REGISTRY) - {"gemma"} <= {f.build().config.model_type for f in FAMILIES.values()}


def test_unsupported_family_names_the_supported_ones():
    config = transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64)
    with pytest.raises(UserError, match=r"unsupported model family 'gpt_neox'; supported: .*llama.*phi3"):
        head_layout(config)


def test_models_re_exports_the_registry_that_docs_adding_a_family_imports():
    # docs/adding-a-family.md registers a family through safety_heads.models: it must be this very registry.
    import safety_heads.layout as layout
    import safety_heads.models as models

    for name in ("FAMILIES", "HeadLayout", "register_family", "head_layout", "layer_part", "resolve"):
        assert getattr(models, name) is getattr(layout, name), name
