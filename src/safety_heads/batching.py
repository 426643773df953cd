"""Prompt batching: left padding, a shared token prefix, and cutting head sets into chunks of one forward pass.

Plain data and arithmetic, no model and no trace: `left_padded` batches prompts of different lengths so that each
row sees exactly what it would alone; `split_shared_prefix` splits a group at the tokens all its prompts begin with
(the engine then computes them once per head set); `plan_chunks` cuts head sets, given by their first ablated layer,
into chunks (`Chunk`) that share one forward pass, by a small cost model (engine.py's module docstring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunk:
    """Head sets that share one forward pass, all ablating nothing below `start_layer`."""

    set_indices: tuple[int, ...]
    start_layer: int


@dataclass
class SharedPrefix:
    """A prompt group split at the tokens all its prompts begin with: the prefix (one row) and the rests, left-padded
    after it (their attention mask spans prefix + rest, their positions continue from the prefix)."""

    length: int
    prefix_inputs: dict  # input_ids, attention_mask, position_ids, each [1, length]
    rest: Batch


@dataclass
class Batch:
    """Prompts left-padded into one tensor: the last position is every row's last prompt token."""

    prompt_indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    shared: SharedPrefix | None = None  # set when the engine computes the group's common prefix once
    # Heads every head set of the call ablates (a Sahara step's group so far): the residuals that prefix reuse feeds
    # into later layers then come from a pass ablating them, and a set's first layer is that of its other heads.
    base: tuple = ()

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def repeated(self, times: int) -> dict:
        """Model inputs with the whole batch tiled `times` times (row = copy * size + prompt)."""
        return dict(
            input_ids=self.input_ids.repeat(times, 1),
            attention_mask=self.attention_mask.repeat(times, 1),
            position_ids=self.position_ids.repeat(times, 1),
        )


def left_padded(
    token_lists: Sequence[Sequence[int]], pad_id: int | None, indices: Sequence[int] | None = None, min_length: int = 0
) -> Batch:
    """Left-pad token lists (to `min_length` at least); positions count real tokens only, so a padded row is
    positioned exactly as it would be alone."""
    length = max(min_length, max(len(ids) for ids in token_lists))
    input_ids = torch.full((len(token_lists), length), 0 if pad_id is None else pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), length), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, length - len(ids) :] = torch.tensor(list(ids))
        attention_mask[row, length - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(list(indices if indices is not None else range(len(token_lists))), input_ids, attention_mask, position_ids)


MIN_SHARED_PREFIX = 2  # tokens; a shorter common prefix is not worth a second trace per chunk


def common_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """How many first tokens all lists share, leaving every list at least one token of its own (its last position
    must be computed with the rest)."""
    shortest = min(len(ids) for ids in token_lists)
    length = 0
    while length < shortest - 1 and all(ids[length] == token_lists[0][length] for ids in token_lists):
        length += 1
    return length


def split_shared_prefix(token_lists: Sequence[Sequence[int]], pad_id: int | None, indices: Sequence[int]) -> SharedPrefix | None:
    """The group's common prefix and its left-padded rests, or None when fewer than two prompts share at least
    MIN_SHARED_PREFIX tokens."""
    length = common_prefix_length(token_lists) if len(token_lists) >= 2 else 0
    if length < MIN_SHARED_PREFIX:
        return None
    prefix = torch.tensor([list(token_lists[0][:length])])
    prefix_inputs = dict(input_ids=prefix, attention_mask=torch.ones_like(prefix), position_ids=torch.arange(length)[None])
    rests = left_padded([ids[length:] for ids in token_lists], pad_id, indices)
    mask = torch.cat([torch.ones(rests.size, length, dtype=torch.long), rests.attention_mask], dim=1)
    return SharedPrefix(length, prefix_inputs, Batch(rests.prompt_indices, rests.input_ids, mask, rests.position_ids + length))


def plan_chunks(
    first_layers: Sequence[int], n_layers: int, rows_per_set: int, max_sets: int, overhead_layer_rows: float, prefix_reuse: bool = True
) -> list[Chunk]:
    """Cut head sets (given by their first ablated layer) into chunks that minimise estimated cost.

    Sets are sorted by first layer. Merging the groups of several first layers into one chunk saves trace overhead
    but runs every row from the lowest of them; a dynamic programme over the groups picks the cheapest cut.
    """
    order = sorted(range(len(first_layers)), key=lambda i: first_layers[i])
    if not order:
        return []
    if not prefix_reuse:
        return [Chunk(tuple(order[i : i + max_sets]), 0) for i in range(0, len(order), max_sets)]
    groups: list[tuple[int, list[int]]] = []
    for index in order:
        if groups and groups[-1][0] == first_layers[index]:
            groups[-1][1].append(index)
        else:
            groups.append((first_layers[index], [index]))

    def cost(first: int, last: int) -> float:
        n_sets = sum(len(groups[g][1]) for g in range(first, last + 1))
        n_chunks = math.ceil(n_sets / max_sets)
        return n_chunks * overhead_layer_rows + n_sets * rows_per_set * (n_layers - groups[first][0])

    best = [0.0] + [math.inf] * len(groups)
    cut = [0] * (len(groups) + 1)
    for end in range(1, len(groups) + 1):
        for start in range(end, 0, -1):
            n_sets = sum(len(groups[g][1]) for g in range(start - 1, end))
            if start < end and n_sets > max_sets:
                break  # merging groups only pays while they fit one chunk
            candidate = best[start - 1] + cost(start - 1, end - 1)
            if candidate < best[end]:
                best[end], cut[end] = candidate, start - 1
    chunks: list[Chunk] = []
    end = len(groups)
    spans = []
    while end > 0:
        spans.append((cut[end], end))
        end = cut[end]
    for start, end in reversed(spans):
        members = [index for g in range(start, end) for index in groups[g][1]]
        for i in range(0, len(members), max_sets):
            piece = tuple(members[i : i + max_sets])
            chunks.append(Chunk(piece, min(first_layers[j] for j in piece)))
    return chunks


def split_rows(group: list[int], rows: int) -> list[list[int]]:
    """`group` cut into runs of at most `rows` (at least one each)."""
    rows = max(1, rows)
    return [group[start : start + rows] for start in range(0, len(group), rows)]
