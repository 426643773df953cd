"""Where a model's attention heads live: the `HeadLayout`, and the registry of family adapters that make one.

A `HeadLayout` says where, inside one decoder layer, a head can be ablated:

- the **query site**: the module whose output holds every query head's query (``q_proj``, the query part of a fused
  ``qkv_proj`` / ``c_attn``, or ``q_norm`` for families that normalise queries per head, where scaling before the norm
  would be undone by it);
- the **output site**: the module whose *input* holds every head's output side by side (``o_proj`` / ``c_proj``),
  the last place where heads still exist.

One small adapter per family, in a registry keyed by ``config.model_type``. To add a family, write a function that
maps its config to a `HeadLayout` and decorate it with ``@register_family("model_type")``; docs/adding-a-family.md
walks through it.

models.py loads a model and asks `head_layout` for its layout; the engine, ablation and surgery reach the sites
through `layer_part` / `resolve`, which work on plain modules and on nnsight envoys alike.

    safety-heads heads --model tiny
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .errors import UserError

QueryAxes = Literal["flat", "bshd", "bhsd"]
WeightLayout = Literal["linear", "conv1d"]


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads of one model family live. Paths are attribute paths relative to the model or to one layer."""

    model_type: str
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int
    head_dim: int
    layers_path: str  # the ModuleList of decoder layers, e.g. "model.layers"
    final_norm_path: str  # the norm before the unembedding, e.g. "model.norm"
    query_path: str  # relative to a layer
    output_path: str  # relative to a layer; its *input* is [..., n_heads * head_dim]
    # How the query site's output is shaped: "flat" = [..., query_offset + n_heads*head_dim + ...] (plain or fused
    # projection), "bshd" = [batch, seq, head, dim], "bhsd" = [batch, head, seq, dim].
    query_axes: QueryAxes = "flat"
    query_offset: int = 0  # where the query block starts in a fused projection's output
    weight_layout: WeightLayout = "linear"  # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
    # The projection whose rows make the query, for surgery; None when a per-head norm sits between it and attention
    # (then scaling its rows would be undone by the norm and `ua` cannot be baked into weights).
    query_weight_path: str | None = None

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def head_slice(self, head: int) -> slice:
        """The columns of a flat [..., n_heads*head_dim] tensor that belong to one query head."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def trace_sites(self) -> dict:
        """The fields in-trace code needs (intrace.py), as a plain dict: remote requests carry it by value, where a
        HeadLayout would make NDIF import this module."""
        return {name: getattr(self, name) for name in TRACE_SITE_FIELDS}

    def check_head(self, layer: int, head: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise UserError(f"layer {layer} is out of range: this model has layers 0-{self.n_layers - 1}")
        if not 0 <= head < self.n_heads:
            raise UserError(f"head {head} is out of range: this model has query heads 0-{self.n_heads - 1} per layer")

    def describe(self) -> str:
        lines = [
            f"family        {self.model_type}",
            f"layers        {self.n_layers}",
            f"query heads   {self.n_heads} per layer ({self.n_total_heads} in all)",
            f"KV heads      {self.n_kv_heads} per layer" + (f" (grouped-query, {self.n_rep} query heads each)" if self.n_rep > 1 else ""),
            f"head_dim      {self.head_dim}",
            f"query site    {self.layers_path}[i].{self.query_path}.output ({self.query_axes}"
            + (f", offset {self.query_offset}" if self.query_offset else "") + ")",
            f"output site   {self.layers_path}[i].{self.output_path}.input",
            f"final norm    {self.final_norm_path}",
            f"ua surgery    {'yes' if self.query_weight_path else 'no (per-head query norm)'}",
        ]
        return "\n".join(lines)


TRACE_SITE_FIELDS = (
    "n_layers", "n_heads", "head_dim", "layers_path", "final_norm_path", "query_path", "output_path", "query_axes", "query_offset",
)


# ----------------------------------------------------------------------------------------------------------------
# The family registry.

FamilyAdapter = Callable[[object], HeadLayout]
FAMILIES: dict[str, FamilyAdapter] = {}


def register_family(*model_types: str) -> Callable[[FamilyAdapter], FamilyAdapter]:
    def decorate(adapter: FamilyAdapter) -> FamilyAdapter:
        for model_type in model_types:
            FAMILIES[model_type] = adapter
        return adapter

    return decorate


def _head_dim(config) -> int:
    # Gemma and Qwen3 set head_dim explicitly and it differs from hidden/heads; older configs omit it and the
    # modelling code then derives it as below, so we do exactly what the model does.
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _llama_like(config, **changes) -> HeadLayout:
    settings = dict(
        model_type=config.model_type,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=_head_dim(config),
        layers_path="model.layers",
        final_norm_path="model.norm",
        query_path="self_attn.q_proj",
        output_path="self_attn.o_proj",
        query_weight_path="self_attn.q_proj",
    )
    settings.update(changes)
    return HeadLayout(**settings)


@register_family("llama", "mistral", "qwen2", "gemma", "gemma2")
def _llama_family(config) -> HeadLayout:
    return _llama_like(config)


@register_family("qwen3")
def _qwen3(config) -> HeadLayout:
    # q_norm runs on q_proj(x).view(b, s, h, d), before the transpose.
    return _llama_like(config, query_path="self_attn.q_norm", query_axes="bshd", query_weight_path=None)


@register_family("gemma3_text")
def _gemma3(config) -> HeadLayout:
    # q_norm runs after the transpose, on [b, h, s, d].
    return _llama_like(config, query_path="self_attn.q_norm", query_axes="bhsd", query_weight_path=None)


@register_family("phi3")
def _phi3(config) -> HeadLayout:
    # Fused qkv_proj: output is [q (H*d) | k (KV*d) | v (KV*d)].
    return _llama_like(config, query_path="self_attn.qkv_proj", query_weight_path="self_attn.qkv_proj")


@register_family("gpt2")
def _gpt2(config) -> HeadLayout:
    # Fused c_attn (a Conv1D, weight stored [in, out]): output is [q | k | v], each n_embd wide.
    return HeadLayout(
        model_type="gpt2",
        n_layers=config.n_layer,
        n_heads=config.n_head,
        n_kv_heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        layers_path="transformer.h",
        final_norm_path="transformer.ln_f",
        query_path="attn.c_attn",
        output_path="attn.c_proj",
        weight_layout="conv1d",
        query_weight_path="attn.c_attn",
    )


def head_layout(config) -> HeadLayout:
    """The HeadLayout for a transformers config, or a one-line error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    adapter = FAMILIES.get(model_type)
    if adapter is None:
        raise UserError(
            f"unsupported model family '{model_type}'; supported: {', '.join(sorted(FAMILIES))} "
            "(docs/adding-a-family.md shows how to add one)"
        )
    for name in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        value = getattr(config, name, 1)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"the {model_type} config has {name}={value!r}; a model needs at least one: check its config.json")
    layout = adapter(config)
    if layout.n_kv_heads < 1 or layout.n_heads % layout.n_kv_heads or layout.head_dim < 1:
        raise UserError(f"the {model_type} config's heads do not fit together ({layout.n_heads} query heads, "
                        f"{layout.n_kv_heads} key/value heads, head_dim {layout.head_dim}): check its config.json")
    return layout


# ----------------------------------------------------------------------------------------------------------------
# Module and envoy access by attribute path.


def resolve(root, path: str):
    """Follow a dotted path (`"model.layers"`) through modules or nnsight envoys alike."""
    node = root
    for part in path.split("."):
        node = getattr(node, part)
    return node


def layer_part(root, layout: HeadLayout, layer: int, path: str):
    """`root.<layers_path>[layer].<path>`, for a module or an nnsight envoy."""
    return resolve(resolve(root, layout.layers_path)[layer], path)
