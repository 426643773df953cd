"""Which forward passes one engine call needs: per prompt group, a `GroupSchedule` (its padded batch and its chunks).

Empty head sets are the clean model, served by the group's clean pass. The heads every other set contains (a Sahara
step's group so far) are the call's *base*: the residuals that prefix reuse feeds into later layers then come from
a pass that ablates them, and a set's first layer is that of its other heads. A group whose prompts share their
first tokens (a template's system prompt) may compute them once per head set (`EngineConfig.shared_prefix`), when
that saves more compute than the second trace per chunk costs. Chunk cutting itself is batching.plan_chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

from .ablation import Head, ablation_pairs
from .batching import Batch, Chunk, SharedPrefix, plan_chunks, split_shared_prefix


class GroupSchedule(NamedTuple):
    """One prompt group's batch and the chunks (head sets that share one forward pass) run on it."""

    batch: Batch
    chunks: list[Chunk]


def schedule_groups(engine, tokens: list[list[int]], sets: list[tuple[Head, ...]]) -> list[GroupSchedule]:
    """Per prompt group (engine sizing): its padded batch and its chunks, with set indices into `sets`."""
    active = [i for i, heads in enumerate(sets) if heads]
    base = common_heads([sets[i] for i in active]) if engine.config.prefix_reuse else ()
    first_layers = [next(layer for layer, head in sets[i] if (layer, head) not in base) for i in active]
    schedules = []
    n_layers, reuse = engine.layout.n_layers, engine.config.prefix_reuse
    for group in engine.prompt_groups(tokens):
        batch = engine.batch(tokens, group, base)
        overhead = engine.overhead_layer_rows(batch.length)
        max_sets = max(1, engine.max_rows(batch.length) // batch.size)
        chunks = plan_chunks(first_layers, n_layers, batch.size, max_sets, overhead, reuse)
        shared = _worth_sharing(engine, tokens, group, batch, len(active), len(chunks)) if active else None
        if shared is not None:
            # Per head set, a chunk now computes the prefix once and every prompt's rest: fewer positions (in units
            # of rows of the full length), two traces, and every layer's keys and values held.
            batch = replace(batch, shared=shared)
            rows_per_set = (shared.length + batch.size * shared.rest.length) / batch.length
            max_sets = max(1, engine.max_rows(batch.length, cached=True) // batch.size)
            chunks = plan_chunks(first_layers, n_layers, rows_per_set, max_sets, 2 * overhead, reuse)
        schedules.append(GroupSchedule(batch, [Chunk(tuple(active[i] for i in chunk.set_indices), chunk.start_layer)
                                               for chunk in chunks]))
    return schedules


def _worth_sharing(engine, tokens, group: list[int], batch: Batch, n_sets: int, n_chunks: int) -> SharedPrefix | None:
    """The group split at its common prefix, when that saves more compute than the extra trace per chunk costs."""
    mode = engine.config.shared_prefix
    if mode == "never":
        return None
    shared = split_shared_prefix([tokens[i] for i in group], engine.model.tokenizer.pad_token_id, group)
    if shared is None or mode == "always":
        return shared
    # Positions saved per head set and layer, in rows of the full length; every set runs about half the layers.
    saved_rows = (batch.size * batch.length - shared.length - batch.size * shared.rest.length) / batch.length
    if saved_rows * n_sets * engine.layout.n_layers / 2 <= n_chunks * engine.overhead_layer_rows(batch.length):
        return None
    return shared


def common_heads(sets: Sequence[tuple]) -> tuple:
    """The heads every set contains, when every set has at least one more (else nothing: a set that is all base
    would have no layer of its own to start from)."""
    if not sets:
        return ()
    common = set(sets[0]).intersection(*map(set, sets[1:]))
    if not common or any(len(heads) == len(common) for heads in sets):
        return ()
    return tuple(sorted(common))


def chunk_pairs(sets, chunk: Chunk) -> dict:
    """The (row, head) pairs of a chunk's sets (row i: set i), without the layers below its start: those are
    skipped, fed the residual of a pass that ablated them already (the base's heads)."""
    pairs = ablation_pairs([sets[i] for i in chunk.set_indices])
    return {layer: layer_pairs for layer, layer_pairs in pairs.items() if layer >= chunk.start_layer}


def base_pairs(batch: Batch) -> dict:
    """The (row, head) pairs that ablate the base's heads in a group's clean pass (one row per prompt copy)."""
    return ablation_pairs([batch.base])


def residual_layers_of(chunks: Sequence[Chunk]) -> list[int]:
    """The layers after which chunks starting above layer 0 take the residual stream."""
    return sorted({chunk.start_layer - 1 for chunk in chunks if chunk.start_layer > 0})
