"""The hot path: last-token readouts for many (prompt, head set) pairs in few forward passes.

Given prompts and a list of head sets, `Engine.run` returns the last-position logits and/or the last-position hidden
state after the final norm, for every pair, plus the clean (unablated) readouts. How:

- **Head sets on the batch axis.** One forward pass carries many copies of a prompt; row r ablates its own head set
  through per-layer masks built inside the trace from small index lists (so remote requests stay small).
- **Prefix reuse.** Layers below a head set's first ablated layer compute exactly what the clean model computes. One
  clean pass saves the residual stream; a chunk whose head sets all start at layer l skips layers 0..l-1 and feeds the
  saved residual into layer l. Head sets are sorted by first layer and cut into chunks by a small cost model (a trace
  has a fixed cost, a layer evaluation a per-row cost), so tiny models get one big trace and large ones reuse prefixes.
- **Memory budget.** Rows per forward pass are capped from an estimate of activation memory per row.
- **Padding.** Prompts of different lengths batch together, left-padded, with position ids that count real tokens
  only, so each row sees exactly what it would alone; `logits_to_keep=1` materialises only the last position.
- **Remote.** With `EngineConfig.remote` the same passes run on NDIF, packed into few requests (one nnsight session
  each: a clean pass, then many chunks); the traced code is intrace.py, which travels by value (docs/remote.md).

Nothing here knows about Ships or Sahara; nothing above this module builds nnsight traces.

    python benchmarks/bench_engine.py
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import nnsight
import torch

from . import intrace
from .ablation import KINDS, Head, ablation_plan, check_epsilon, check_kind
from .errors import UserError
from .flops import flop_model
from .models import LoadedModel, resolve

READOUTS = ("logits", "hidden")
HIDDEN_READOUTS = ("final-norm", "last-layer")

# The fixed cost of one trace, in floating-point operations of model compute it is worth (measured roughly: ~2 ms of
# Python and nnsight bookkeeping per trace, against a CPU doing ~5e10 flop/s and a GPU ~1e13 on these shapes). It only
# steers how head sets are grouped into chunks; results do not depend on it.
TRACE_OVERHEAD_FLOPS = {"cpu": 3e8, "cuda": 2e10}
DEFAULT_CPU_BUDGET_MB = 2048
# NDIF: the server's free memory is unknown here. 16 GiB of activations per forward pass fits beside a 7-13B bf16
# model on one 80 GB GPU; --memory-budget overrides it.
DEFAULT_REMOTE_BUDGET_MB = 16384
SHARED_PREFIX_MODES = ("auto", "always", "never")
MAX_PADDING_SHARE = 0.15  # a prompt group stops growing before padding exceeds this share of its positions
GPU_BUDGET_FRACTION = 0.5


@dataclass
class EngineConfig:
    """How the engine batches. Shared by the command line and the Python API."""

    memory_budget_mb: float | None = None  # activation memory per forward pass; None = 2 GiB on CPU, half of free GPU memory
    max_batch_rows: int | None = None  # hard cap on rows per forward pass, on top of the budget
    prefix_reuse: bool = True
    # Where the "hidden" readout is taken at the last position: "final-norm" (the final norm's output, as the paper's
    # code) or "last-layer" (the last layer's output, before the final norm, as the cookbook notebook). Sahara sets it.
    hidden_readout: str = "final-norm"
    # Compute a prompt group's shared first tokens (a template's system prompt and role markers) once per head set and
    # run every prompt's remaining tokens on their KV cache (intrace.shared_clean_pass). Exact either way. "auto": when
    # the compute it saves outweighs a second trace per chunk; "always": whenever two prompts share two tokens; "never".
    shared_prefix: str = "auto"
    # False: run here. True: run on NDIF (NDIF_HOST or nnsight's configured host). "http(s)://...": that host.
    # "local": nnsight's simulation of a remote request (serialise, deserialise, run here) -- the offline proof that
    # the in-trace code travels. Remote runs send one request per group of chunks (docs/remote.md).
    remote: bool | str = False
    remote_chunks_per_request: int | None = None  # cap on chunks (forward passes) per request; None = the result budget decides
    remote_result_mb: float = 256.0  # readouts one request may return (they wait on the server, then download)
    remote_attempts: int = 5  # tries per request step (send, poll) on transient failures
    remote_backoff_s: float = 2.0  # first retry delay, doubled on each further retry
    remote_poll_s: float = 1.0  # first interval between polls of a running job (grows to 10x)
    remote_wait_s: float = 7200.0  # give up on a job that has not finished after this long (queue + run)
    # The API key goes only to nnsight's configured NDIF host, unless the user says they trust the one they named.
    trust_remote_host: bool = field(default=False, metadata={"recorded": False})

    def validate(self) -> None:
        if self.shared_prefix not in SHARED_PREFIX_MODES:
            raise UserError(f"--shared-prefix must be one of {', '.join(SHARED_PREFIX_MODES)}, not {self.shared_prefix!r}")
        if self.memory_budget_mb is not None and not (self.memory_budget_mb > 0 and math.isfinite(self.memory_budget_mb)):
            raise UserError(f"--memory-budget must be a positive number of MB, not {self.memory_budget_mb!r}")
        if self.hidden_readout not in HIDDEN_READOUTS:
            raise UserError(f"--readout must be one of {', '.join(HIDDEN_READOUTS)}, not {self.hidden_readout!r}")
        if self.max_batch_rows is not None and self.max_batch_rows < 1:
            raise UserError(f"--max-batch-rows must be at least 1, not {self.max_batch_rows!r}")
        from .remote import check_remote_setting

        check_remote_setting(self.remote, self.trust_remote_host)
        if self.remote_chunks_per_request is not None and self.remote_chunks_per_request < 1:
            raise UserError(f"--remote-chunks-per-request must be at least 1, not {self.remote_chunks_per_request!r}")
        if not (self.remote_result_mb > 0 and math.isfinite(self.remote_result_mb)):
            raise UserError(f"--remote-result-mb must be a positive number of MB, not {self.remote_result_mb!r}")
        if self.remote_attempts < 1:
            raise UserError(f"--remote-attempts must be at least 1, not {self.remote_attempts!r}")
        for name in ("remote_backoff_s", "remote_poll_s", "remote_wait_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"{name} must be a non-negative number of seconds, not {value!r}")


@dataclass
class EngineResult:
    """Readouts for every (prompt, head set) pair, in float32 on the CPU. Missing readouts are None."""

    logits: torch.Tensor | None  # [prompts, head sets, vocab]
    hidden: torch.Tensor | None  # [prompts, head sets, d_model], after the final norm
    clean_logits: torch.Tensor | None  # [prompts, vocab]
    clean_hidden: torch.Tensor | None  # [prompts, d_model]
    stats: dict = field(default_factory=dict)  # traces run, rows, layer evaluations: what the benchmarks report


@dataclass(frozen=True)
class Chunk:
    """Head sets that share one forward pass, all ablating nothing below `start_layer`."""

    set_indices: tuple[int, ...]
    start_layer: int


@dataclass
class ChunkResult:
    """What one forward pass produced: readouts for `set_indices` x `prompt_indices` (sets first)."""

    prompt_indices: list[int]
    set_indices: tuple[int, ...]
    logits: torch.Tensor | None  # [sets, prompts, vocab]
    hidden: torch.Tensor | None


@dataclass
class RequestPart:
    """The share of one prompt group in a remote request: its clean readouts (the group's first request returns
    them) and/or some of its chunks."""

    batch: "Batch"
    clean: bool
    chunks: list[Chunk]


@dataclass
class Request:
    """One remote request: consecutive chunks of one or more prompt groups, run in one NDIF session (a clean pass
    per group provides the residuals prefix reuse needs; only last-position readouts come back)."""

    parts: list[RequestPart]

    @property
    def n_chunks(self) -> int:
        return sum(len(part.chunks) for part in self.parts)

    @property
    def n_rows(self) -> int:
        """Ablated rows (head sets x prompts) the request computes."""
        return sum(len(chunk.set_indices) * part.batch.size for part in self.parts for chunk in part.chunks)


@dataclass
class SharedPrefix:
    """A prompt group split at the tokens all its prompts begin with: the prefix (one row) and the rests, left-padded
    after it (their attention mask spans prefix + rest, their positions continue from the prefix)."""

    length: int
    prefix_inputs: dict  # input_ids, attention_mask, position_ids, each [1, length]
    rest: "Batch"


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


class Engine:
    """Batched, exact head ablation for one loaded model."""

    def __init__(self, model: LoadedModel, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.config.validate()
        self.layout = model.layout
        # What in-trace code needs, as plain data (intrace.py), and the name the model gives its KV cache argument
        # and output field (transformers renamed past_key_values to cache).
        self.sites = {**model.layout.trace_sites(), "cache_name": _cache_name(model.module),
                      "hidden_readout": self.config.hidden_readout}
        hf_config = model.module.config
        self.d_model = hf_config.hidden_size if hasattr(hf_config, "hidden_size") else hf_config.n_embd
        self.context_length = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
        self.flops = flop_model(model.module, resolve(model.module, self.layout.layers_path), self.layout.n_heads, self.layout.head_dim)

    # -- inputs ------------------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Token ids per prompt: strings with the tokenizer's defaults (special tokens as it adds them)."""
        if len(prompts) == 0:
            raise UserError("no prompts given")
        tokens = []
        for index, prompt in enumerate(prompts):
            ids = list(prompt) if not isinstance(prompt, str) else self.model.tokenizer(prompt).input_ids
            if not ids:
                raise UserError(f"prompt {index} is empty")
            if self.context_length and len(ids) > self.context_length:
                raise UserError(
                    f"prompt {index} is {len(ids)} tokens long, beyond the model's context of {self.context_length}; "
                    "shorten it or drop it"
                )
            tokens.append(ids)
        return tokens

    def _batch(self, tokens: list[list[int]], indices: list[int]) -> Batch:
        return left_padded([tokens[i] for i in indices], self.model.tokenizer.pad_token_id, indices)

    def _normalise_sets(self, head_sets: Sequence[Sequence[Head]]) -> list[tuple[Head, ...]]:
        normalised = []
        for heads in head_sets:
            unique = tuple(sorted({(int(layer), int(head)) for layer, head in heads}))
            for layer, head in unique:
                self.layout.check_head(layer, head)
            normalised.append(unique)
        return normalised

    # -- sizing ------------------------------------------------------------------------------------------------

    @property
    def remote(self) -> bool:
        """Whether traces run as remote requests (NDIF, another host, or nnsight's local simulation of one)."""
        return bool(self.config.remote)

    @property
    def on_server(self) -> bool:
        """Whether the forward passes run on a remote server (whose GPUs we size for), not on this machine."""
        return self.remote and self.config.remote != "local"

    def _device_kind(self) -> str:
        if self.on_server:
            return "cuda"
        return "cuda" if self.model.device.type == "cuda" else "cpu"

    def _budget_bytes(self) -> float:
        if self.config.memory_budget_mb is not None:
            return self.config.memory_budget_mb * 2**20
        if self.on_server:
            return DEFAULT_REMOTE_BUDGET_MB * 2**20
        if self._device_kind() == "cuda":
            # Under device_map="auto" (--device multi) each GPU holds some layers and runs every row through them, so
            # the per-row peak (one layer's activations) is needed on each: the tightest GPU sets the budget.
            if not hasattr(self, "_gpus"):
                self._gpus = sorted({p.device for p in self.model.module.parameters() if p.device.type == "cuda"}, key=str)
            return min(torch.cuda.mem_get_info(device)[0] for device in self._gpus) * GPU_BUDGET_FRACTION
        return DEFAULT_CPU_BUDGET_MB * 2**20

    def bytes_per_row(self, length: int, cached: bool = False) -> float:
        """Peak activation memory of one row of one forward pass, roughly (no gradients are kept); `cached`: the pass
        also holds every layer's keys and values (a shared prefix's cache)."""
        hf_config = self.model.module.config
        intermediate = getattr(hf_config, "intermediate_size", None) or 4 * self.d_model
        itemsize = torch.finfo(self.model.dtype).bits // 8
        per_position = 12 * self.d_model + 4 * intermediate + 3 * self.layout.n_heads * length
        if cached:
            per_position += 2 * self.layout.n_layers * self.layout.n_kv_heads * self.layout.head_dim
        return length * per_position * itemsize + 2 * hf_config.vocab_size * 4

    def max_rows(self, length: int, cached: bool = False) -> int:
        rows = int(self._budget_bytes() // self.bytes_per_row(length, cached))
        if self.config.max_batch_rows is not None:
            rows = min(rows, self.config.max_batch_rows)
        return max(rows, 1)

    def _pass_flops(self, batch: Batch, chunk: Chunk | None) -> float:
        """FLOPs (flops.py) of a group's clean pass (`chunk` None) or of one chunk's ablated pass: the layers from the
        chunk's first ablated layer up, and the unembedding at each row's last position."""
        model, n_layers = self.flops, self.layout.n_layers
        n_sets, layers = (1, n_layers) if chunk is None else (len(chunk.set_indices), n_layers - chunk.start_layer)
        shared = batch.shared
        if shared is None:
            rows = n_sets * batch.size
            return model.layers(rows, batch.length, batch.length, layers) + model.head(rows)
        prefix, rest = shared.length, shared.rest.length
        return (model.layers(n_sets, prefix, prefix, layers) + model.head(n_sets)
                + model.layers(n_sets * batch.size, rest, prefix + rest, layers) + model.head(n_sets * batch.size))

    def _overhead_layer_rows(self, length: int) -> float:
        """A trace's fixed cost in units of one layer evaluated on one row."""
        layer = resolve(self.model.module, self.layout.layers_path)[0]
        params = sum(p.numel() for p in layer.parameters())
        flops = 2 * length * params + 4 * length * length * self.layout.n_heads * self.layout.head_dim
        return TRACE_OVERHEAD_FLOPS[self._device_kind()] / max(flops, 1)

    def _prompt_groups(self, tokens: list[list[int]]) -> list[list[int]]:
        """Prompts sorted by length and cut into groups that fit one forward pass, with padding kept under
        MAX_PADDING_SHARE of the group's positions (padded positions cost as much compute as real ones)."""
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
        groups: list[list[int]] = []
        for index in order:
            if groups:
                candidate = groups[-1] + [index]
                longest = len(tokens[index])
                real = sum(len(tokens[i]) for i in candidate)
                if len(candidate) <= self.max_rows(longest) and real >= (1 - MAX_PADDING_SHARE) * longest * len(candidate):
                    groups[-1] = candidate
                    continue
            groups.append([index])
        return groups

    # -- traces ------------------------------------------------------------------------------------------------

    # The traces themselves live in intrace.py, which NDIF receives by value; here they run in this process, so the
    # outermost trace must save what it returns (nnsight.save).

    def _clean_pass(self, batch: Batch, residual_layers: set[int], readouts: tuple[str, ...], base=None):
        residuals, readout = intrace.clean_pass(self.model.lm, self.sites, self.model.on_device(batch.repeated(1)), residual_layers, readouts,
                                                nnsight.save, base=base)
        return residuals, _to_cpu_float(readout.get("logits")), _to_cpu_float(readout.get("hidden"))

    def _shared_clean_pass(self, batch: Batch, residual_layers: set[int], readouts: tuple[str, ...], base=None):
        """The clean (or, with `base`, base-ablated) pass of a group with a shared prefix: the prefix's keys and
        values, the residuals (prefix and rests, as a pair per layer) and the readouts."""
        shared = batch.shared
        prefix_kv, prefix_residuals, rest_residuals, readout = intrace.shared_clean_pass(
            self.model.lm, self.sites, self.model.on_device(shared.prefix_inputs), self.model.on_device(shared.rest.repeated(1)),
            residual_layers, readouts, nnsight.save, base=base,
        )
        residuals = {layer: (prefix_residuals[layer], rest_residuals[layer]) for layer in residual_layers}
        return prefix_kv, residuals, _to_cpu_float(readout.get("logits")), _to_cpu_float(readout.get("hidden"))

    def _shared_ablated_pass(self, batch: Batch, chunk: Chunk, sets, prefix_kv, residual, kind, epsilon, means, readouts):
        shared, n_sets = batch.shared, len(chunk.set_indices)
        prefix_residual, rest_residual = residual if residual is not None else (None, None)
        readout = intrace.shared_ablated_pass(
            self.model.lm, self.sites, self.model.on_device(shared.prefix_inputs), self.model.on_device(shared.rest.repeated(1)),
            prefix_kv, n_sets, chunk.start_layer,
            _chunk_plan(sets, chunk), prefix_residual, rest_residual, kind, epsilon, means, readouts, nnsight.save,
        )
        return _by_set(readout.get("logits"), n_sets, batch.size), _by_set(readout.get("hidden"), n_sets, batch.size)

    def _ablated_pass(self, batch: Batch, chunk: Chunk, sets, residual, kind, epsilon, means, readouts, check_layers=False):
        n_sets = len(chunk.set_indices)
        plan = _chunk_plan(sets, chunk)
        readout, finite = intrace.ablated_pass(
            self.model.lm, self.sites, self.model.on_device(batch.repeated(1)), n_sets, chunk.start_layer, plan, residual, kind, epsilon, means,
            readouts, nnsight.save, check_layers=check_layers,
        )
        if check_layers:
            return _first_non_finite(chunk.start_layer, finite)
        return _by_set(readout.get("logits"), n_sets, batch.size), _by_set(readout.get("hidden"), n_sets, batch.size)

    # -- remote requests ---------------------------------------------------------------------------------------------

    def _group_plans(self, tokens: list[list[int]], sets: list[tuple[Head, ...]]) -> list[tuple[Batch, list[Chunk]]]:
        """Per prompt group: its padded batch and its chunks (head sets that share one forward pass)."""
        # Empty head sets are the clean model: served from the clean pass, never run again.
        active = [i for i, heads in enumerate(sets) if heads]
        base = _common_heads([sets[i] for i in active]) if self.config.prefix_reuse else ()
        first_layers = [next(layer for layer, head in sets[i] if (layer, head) not in base) for i in active]
        plans = []
        n_layers, reuse = self.layout.n_layers, self.config.prefix_reuse
        for group in self._prompt_groups(tokens):
            batch = self._batch(tokens, group)
            batch.base = base
            overhead = self._overhead_layer_rows(batch.length)
            max_sets = max(1, self.max_rows(batch.length) // batch.size)
            chunks = plan_chunks(first_layers, n_layers, batch.size, max_sets, overhead, reuse)
            shared = self._shared_prefix(tokens, group, batch, len(active), len(chunks)) if active else None
            if shared is not None:
                # Per head set, a chunk now computes the prefix once and every prompt's rest: fewer positions (in
                # units of rows of the full length), two traces, and every layer's keys and values held.
                batch.shared = shared
                rows_per_set = (shared.length + batch.size * shared.rest.length) / batch.length
                max_sets = max(1, self.max_rows(batch.length, cached=True) // batch.size)
                chunks = plan_chunks(first_layers, n_layers, rows_per_set, max_sets, 2 * overhead, reuse)
            plans.append((batch, [Chunk(tuple(active[i] for i in chunk.set_indices), chunk.start_layer) for chunk in chunks]))
        return plans

    def _base(self, batch: Batch, residual_layers, kind, epsilon, means) -> dict | None:
        """What intrace's clean passes need to ablate the heads common to every set (None: nothing to ablate)."""
        if not batch.base or not residual_layers:
            return None
        return dict(plan=ablation_plan([batch.base]), kind=kind, epsilon=epsilon, means=self._means_for(means, {l for l, _ in batch.base}))

    def _shared_prefix(self, tokens: list[list[int]], group: list[int], batch: Batch, n_sets: int, n_chunks: int) -> SharedPrefix | None:
        """The group split at its common prefix, when that saves more compute than the extra trace per chunk costs."""
        if self.config.shared_prefix == "never":
            return None
        shared = split_shared_prefix([tokens[i] for i in group], self.model.tokenizer.pad_token_id, group)
        if shared is None or self.config.shared_prefix == "always":
            return shared
        # Positions saved per head set and layer, in rows of the full length; every set runs about half the layers.
        saved_rows = (batch.size * batch.length - shared.length - batch.size * shared.rest.length) / batch.length
        if saved_rows * n_sets * self.layout.n_layers / 2 <= n_chunks * self._overhead_layer_rows(batch.length):
            return None
        return shared

    def _requests(self, plans: list[tuple[Batch, list[Chunk]]], readouts: tuple[str, ...]) -> list[Request]:
        """Pack the groups' clean readouts and chunks, in order, into as few requests as the result budget
        (`remote_result_mb`) and the chunk cap (`remote_chunks_per_request`) allow."""
        hf_config = self.model.module.config
        width = sum(hf_config.vocab_size if name == "logits" else self.d_model for name in readouts)
        row_bytes = width * (torch.finfo(self.model.dtype).bits // 8)
        limit, cap = self.config.remote_result_mb * 2**20, self.config.remote_chunks_per_request
        requests: list[Request] = []
        parts: list[RequestPart] = []
        size = n_chunks = 0
        for batch, chunks in plans:
            for chunk in [None, *chunks]:  # None: the group's clean readouts
                cost = batch.size * (1 if chunk is None else len(chunk.set_indices)) * row_bytes
                if parts and (size + cost > limit or (chunk is not None and cap is not None and n_chunks >= cap)):
                    requests.append(Request(parts))
                    parts, size, n_chunks = [], 0, 0
                if not parts or parts[-1].batch is not batch:
                    parts.append(RequestPart(batch, False, []))
                if chunk is None:
                    parts[-1].clean = True
                else:
                    parts[-1].chunks.append(chunk)
                    n_chunks += 1
                size += cost
        if parts:
            requests.append(Request(parts))
        return requests

    def _payload(self, request: Request, sets, kind, epsilon, means, readouts, check_layers: bool = False) -> dict:
        """What intrace.run_request receives: plain data only (token ids, small index lists, the means it needs)."""
        groups, layers = [], set()
        for part in request.parts:
            chunks = []
            for chunk in part.chunks:
                plan = _chunk_plan(sets, chunk)
                layers.update(plan)
                chunks.append((chunk.start_layer, len(chunk.set_indices), plan))
            residual_layers = residual_layers_of(part.chunks)
            base = ablation_plan([part.batch.base]) if part.batch.base and residual_layers else None
            layers.update(base or {})
            shared = part.batch.shared if not check_layers else None  # a diagnosis runs the whole prompts
            groups.append({
                "inputs": part.batch.repeated(1) if shared is None else shared.rest.repeated(1),
                "prefix": None if shared is None else shared.prefix_inputs,
                "base": base,
                "clean": part.clean, "residual_layers": residual_layers, "chunks": chunks,
            })
        return {
            "kind": kind,
            "epsilon": float(epsilon),
            "readouts": tuple(readouts),
            "check_layers": check_layers,
            # Only the layers this request ablates, in the model's dtype (what the in-trace edit converts to anyway).
            "means": self._means_for(means, layers),
            "groups": groups,
        }

    def _means_for(self, means: torch.Tensor | None, layers) -> dict | None:
        """Only the reference means of the layers a pass ablates, in the model's dtype (what the in-trace edit
        converts to anyway): all a remote request needs to carry."""
        return None if means is None else {layer: means[layer].to(self.model.dtype) for layer in sorted(layers)}

    def inputs(self, inputs: dict) -> dict:
        """Model inputs for a trace: on the model's device when it runs here, as they are (CPU) for a remote request."""
        return inputs if self.remote else self.model.on_device(inputs)

    def call(self, function, *arguments, label: str = "request", stats: dict | None = None):
        """Run an intrace.py function that opens traces as one remote request (config.remote), retried on
        transient failures; a failure becomes a one-line UserError naming `label`."""
        from .remote import RemoteFailure, ServerError, call, make_backend

        backend = make_backend(self.model, self.config)
        where = "NDIF" if self.on_server else "remote"
        try:
            result = call(self.model.lm, backend, function, self.sites, *arguments)
        except RemoteFailure as failure:
            what = "failed on the server" if isinstance(failure, ServerError) else "failed"
            raise UserError(f"{where} {label} {what}: {failure}; finished work is kept (rerun with --resume)") from None
        if stats is not None:
            stats["requests"] = stats.get("requests", 0) + 1
            stats["request_bytes"] = stats.get("request_bytes", 0) + getattr(backend, "payload_bytes", 0)
        return result

    def plan_requests(
        self, prompts: Sequence[str | Sequence[int]], head_sets: Sequence[Sequence[Head]], readouts: Sequence[str] = ("logits",)
    ) -> list[Request]:
        """The requests a remote run of (prompts, head sets) sends, planned without running anything."""
        return self._requests(self._group_plans(self.tokenize(prompts), self._normalise_sets(head_sets)), tuple(readouts))

    def request_payloads(
        self,
        prompts: Sequence[str | Sequence[int]],
        head_sets: Sequence[Sequence[Head]],
        *,
        kind: str = "ua",
        epsilon: float = 1e-4,
        means: torch.Tensor | None = None,
        readouts: Sequence[str] = ("logits",),
    ) -> list[bytes]:
        """The serialised requests a remote run would send, byte for byte (nothing is sent, nothing runs)."""
        from .remote import CaptureBackend, call

        readouts = tuple(readouts)
        sets = self._normalise_sets(head_sets)
        capture = CaptureBackend()
        for request in self._requests(self._group_plans(self.tokenize(prompts), sets), readouts):
            call(self.model.lm, capture, intrace.run_request, self.sites, self._payload(request, sets, kind, epsilon, means, readouts))
        return capture.payloads

    def _remote_diagnosis(self, batch: Batch, chunk: Chunk, sets, kind, epsilon, means, readouts, stats) -> int | None:
        request = Request([RequestPart(batch, False, [chunk])])
        payload = self._payload(request, sets, kind, epsilon, means, readouts, check_layers=True)
        flags = self.call(intrace.run_request, payload, label="diagnosis request (non-finite values)", stats=stats)[0]
        return _first_non_finite(chunk.start_layer, flags)

    # -- public ------------------------------------------------------------------------------------------------

    def stream(
        self,
        prompts: Sequence[str | Sequence[int]],
        head_sets: Sequence[Sequence[Head]],
        *,
        kind: str = "ua",
        epsilon: float = 1e-4,
        means: torch.Tensor | None = None,
        readouts: Sequence[str] = ("logits",),
        stats: dict | None = None,
    ) -> Iterator[tuple[str, ChunkResult]]:
        """Yield ("clean", ...) once per prompt group, then ("ablated", ...) per chunk, as they finish."""
        _check_ablation(kind, epsilon, means)
        readouts = tuple(readouts)
        if not readouts or any(r not in READOUTS for r in readouts):
            raise ValueError(f"readouts must be a non-empty subset of {READOUTS}")
        tokens = self.tokenize(prompts)
        sets = self._normalise_sets(head_sets)
        stats = stats if stats is not None else {}
        for key in ("traces", "rows", "layer_rows", "flops"):
            stats.setdefault(key, 0)
        n_layers = self.layout.n_layers
        plans = self._group_plans(tokens, sets)
        if self.remote:
            yield from self._stream_remote(plans, sets, kind, epsilon, means, readouts, stats)
            return
        for batch, plan in plans:
            group = batch.prompt_indices
            residual_layers = set(residual_layers_of(plan))
            base = self._base(batch, residual_layers, kind, epsilon, means)
            clean_pass = self._shared_clean_pass if batch.shared is not None else self._clean_pass
            *residual_part, clean_logits, clean_hidden = clean_pass(batch, set() if base else residual_layers, readouts)
            if base is not None:  # the residuals of the heads every set ablates, not of the clean model
                *residual_part, _, _ = clean_pass(batch, residual_layers, readouts, base)
                _count(stats, batch.size, n_layers, self._pass_flops(batch, None))
            if batch.shared is not None:
                prefix_kv, residuals = residual_part
            else:
                (residuals,) = residual_part
            if not _finite(clean_logits, clean_hidden):
                layer = self._ablated_pass(batch, Chunk((0,), 0), [()], None, kind, epsilon, means, readouts, check_layers=True)
                _report_non_finite("the clean model", layer, self.model.dtype)
            _count(stats, batch.size, n_layers, self._pass_flops(batch, None))
            yield "clean", ChunkResult(group, (), clean_logits, clean_hidden)
            for chunk in plan:
                residual = residuals.get(chunk.start_layer - 1)
                if batch.shared is not None:
                    logits, hidden = self._shared_ablated_pass(batch, chunk, sets, prefix_kv, residual, kind, epsilon, means, readouts)
                else:
                    logits, hidden = self._ablated_pass(batch, chunk, sets, residual, kind, epsilon, means, readouts)
                if not _finite(logits, hidden):
                    # Diagnosed on the whole prompts (no shared prefix), from the full batch's clean residual.
                    if batch.shared is not None:
                        residual = self._clean_pass(batch, residual_layers, readouts, base)[0].get(chunk.start_layer - 1)
                    layer = self._ablated_pass(batch, chunk, sets, residual, kind, epsilon, means, readouts, check_layers=True)
                    _report_non_finite("an ablated model", layer, self.model.dtype)
                _count(stats, len(chunk.set_indices) * batch.size, n_layers - chunk.start_layer, self._pass_flops(batch, chunk))
                yield "ablated", ChunkResult(group, chunk.set_indices, logits, hidden)

    def _stream_remote(self, plans, sets, kind, epsilon, means, readouts, stats) -> Iterator[tuple[str, ChunkResult]]:
        """`stream` through remote requests: the same passes, grouped into few requests (see `_requests`)."""
        n_layers = self.layout.n_layers
        stats.setdefault("requests", 0)
        requests = self._requests(plans, readouts)
        for number, request in enumerate(requests, start=1):
            payload = self._payload(request, sets, kind, epsilon, means, readouts)
            first = min(chunk.start_layer for part in request.parts for chunk in part.chunks) if request.n_chunks else None
            label = (f"request {number} of {len(requests)} ({request.n_chunks} chunks, {request.n_rows} ablated rows"
                     + (f", head sets starting at layer {first} or above" if first is not None else ", clean readouts only") + ")")
            results = iter(self.call(intrace.run_request, payload, label=label, stats=stats))
            for part in request.parts:
                batch, group = part.batch, part.batch.prompt_indices
                if part.clean or any(chunk.start_layer > 0 for chunk in part.chunks):
                    _count(stats, batch.size, n_layers, self._pass_flops(batch, None))  # the clean pass this request ran for the group
                if part.batch.base and part.clean and residual_layers_of(part.chunks):
                    _count(stats, batch.size, n_layers, self._pass_flops(batch, None))  # and the base pass beside it
                if part.clean:
                    readout = next(results)
                    clean_logits, clean_hidden = _to_cpu_float(readout.get("logits")), _to_cpu_float(readout.get("hidden"))
                    if not _finite(clean_logits, clean_hidden):
                        layer = self._remote_diagnosis(batch, Chunk((0,), 0), [()], kind, epsilon, means, readouts, stats)
                        _report_non_finite("the clean model", layer, self.model.dtype)
                    yield "clean", ChunkResult(group, (), clean_logits, clean_hidden)
                for chunk in part.chunks:
                    readout, n_sets = next(results), len(chunk.set_indices)
                    logits, hidden = _by_set(readout.get("logits"), n_sets, batch.size), _by_set(readout.get("hidden"), n_sets, batch.size)
                    if not _finite(logits, hidden):
                        layer = self._remote_diagnosis(batch, chunk, sets, kind, epsilon, means, readouts, stats)
                        _report_non_finite("an ablated model", layer, self.model.dtype)
                    _count(stats, n_sets * batch.size, n_layers - chunk.start_layer, self._pass_flops(batch, chunk))
                    yield "ablated", ChunkResult(group, chunk.set_indices, logits, hidden)

    def run(
        self,
        prompts: Sequence[str | Sequence[int]],
        head_sets: Sequence[Sequence[Head]],
        *,
        kind: str = "ua",
        epsilon: float = 1e-4,
        means: torch.Tensor | None = None,
        readouts: Sequence[str] = ("logits",),
    ) -> EngineResult:
        """Readouts for every (prompt, head set) pair; see the module docstring for how they are batched."""
        readouts = tuple(readouts)
        n_prompts, n_sets = len(prompts), len(head_sets)
        stats: dict = {}
        out: dict[str, torch.Tensor] = {}
        clean: dict[str, torch.Tensor] = {}
        empty_sets = [i for i, heads in enumerate(head_sets) if len(heads) == 0]
        for what, part in self.stream(prompts, head_sets, kind=kind, epsilon=epsilon, means=means, readouts=readouts, stats=stats):
            for name, values in (("logits", part.logits), ("hidden", part.hidden)):
                if values is None:
                    continue
                if what == "clean":
                    clean.setdefault(name, torch.empty(n_prompts, values.shape[-1]))[part.prompt_indices] = values
                    target = out.setdefault(name, torch.empty(n_prompts, n_sets, values.shape[-1]))
                    for set_index in empty_sets:
                        target[part.prompt_indices, set_index] = values
                else:
                    target = out.setdefault(name, torch.empty(n_prompts, n_sets, values.shape[-1]))
                    prompt_index = torch.tensor(part.prompt_indices)
                    set_index = torch.tensor(part.set_indices)
                    target[prompt_index[None, :], set_index[:, None]] = values
        return EngineResult(out.get("logits"), out.get("hidden"), clean.get("logits"), clean.get("hidden"), stats)

    def token_log_probs(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """log p(token t | tokens before t) under the unablated model, for t = 1 .. n-1 of each sequence: a float32
        tensor of n-1 values per sequence. Used to score answers (evaluate.py); padding changes nothing."""
        tokens = self.tokenize(sequences)
        last = max(len(ids) for ids in tokens) - 1
        if last < 1:
            return [torch.empty(0) for _ in tokens]
        values = self.ablated_token_log_probs(tokens, [[]], last)[0]
        return [values[index, last - (len(ids) - 1) :] for index, ids in enumerate(tokens)]

    def ablated_token_log_probs(
        self,
        sequences: Sequence[Sequence[int]],
        head_sets: Sequence[Sequence[Head]],
        last: int,
        *,
        kind: str = "ua",
        epsilon: float = 1e-4,
        means: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p of each sequence's `last` final tokens (teacher-forced) with each head set ablated: [sets, sequences,
        last] float32, NaN where a sequence has fewer than `last` + 1 tokens (its first token has no prediction). An
        empty set is the clean model. Used by Sahara's harmless guard (how likely the ablated model finds the clean
        model's own answers) and, with the empty set, by `token_log_probs`. No prefix reuse: every layer runs for every
        set. Only the picked values leave the trace."""
        _check_ablation(kind, epsilon, means)
        if last < 1:
            raise ValueError(f"last must be at least 1, not {last}")
        tokens = self.tokenize(sequences)
        sets = self._normalise_sets(head_sets)
        vocabulary = self.model.lm.config.get_text_config().vocab_size
        result = torch.empty(len(sets), len(tokens), last)
        requests = 0
        for group in self._prompt_groups(tokens):
            # a row holds one layer's activations and, at the end, [last + 1, vocabulary] logits and their log-softmax
            length = max(len(tokens[group[-1]]), last + 1)  # groups are sorted by length
            rows = max(1, int(self._budget_bytes() // (self.bytes_per_row(length) + 8 * vocabulary * (last + 1))))
            if self.config.max_batch_rows is not None:
                rows = min(rows, self.config.max_batch_rows)
            for part in _split_rows(group, rows):
                batch = left_padded([tokens[i] for i in part], self.model.tokenizer.pad_token_id, part, min_length=last + 1)
                max_sets = max(1, rows // batch.size)
                for start in range(0, len(sets), max_sets):
                    chunk = sets[start : start + max_sets]
                    plan = ablation_plan(chunk)
                    arguments = (self.inputs(batch.repeated(1)), plan, len(chunk), kind, float(epsilon),
                                 self._means_for(means, plan), last)
                    if self.remote:
                        requests += 1
                        values = self.call(intrace.token_log_probs, *arguments, label=f"answer-scoring request {requests}")
                    else:
                        values = intrace.token_log_probs(self.model.lm, self.sites, *arguments, save=nnsight.save)
                    values = values.float().cpu().reshape(len(chunk), batch.size, last)
                    result[start : start + len(chunk), batch.prompt_indices] = values
        for index, ids in enumerate(tokens):
            result[:, index, : max(0, last + 1 - len(ids))] = float("nan")  # predictions of padding, not of the sequence
        return result

    def head_means(self, prompts: Sequence[str | Sequence[int]]) -> torch.Tensor:
        """Mean of every head's output (the output projection's input) over all real tokens of `prompts`.

        Returns [n_layers, n_heads * head_dim] in float32: the reference for `mean` ablation. Padding is excluded.
        """
        layout = self.layout
        tokens = self.tokenize(prompts)
        total = torch.zeros(layout.n_layers, layout.n_heads * layout.head_dim, dtype=torch.float64)
        count = 0
        batches = [self._batch(tokens, group) for group in self._prompt_groups(tokens)]
        for number, batch in enumerate(batches, start=1):
            if self.remote:  # a forward pass per request: the sums are all that comes back
                sums = self.call(intrace.head_sums, batch.repeated(1), label=f"reference-mean request {number} of {len(batches)}")
            else:
                sums = intrace.head_sums(self.model.lm, self.sites, self.model.on_device(batch.repeated(1)), nnsight.save)
            total += sums.cpu()
            count += int(batch.attention_mask.sum())
        return (total / count).float()


def _common_heads(sets: Sequence[tuple]) -> tuple:
    """The heads every set contains, when every set has at least one more (else nothing: a set that is all base
    would have no layer of its own to start from)."""
    if not sets:
        return ()
    common = set(sets[0]).intersection(*map(set, sets[1:]))
    if not common or any(len(heads) == len(common) for heads in sets):
        return ()
    return tuple(sorted(common))


def _chunk_plan(sets, chunk: Chunk) -> dict:
    """The ablation plan of a chunk's sets (row i: set i), without the layers below its start: those are skipped,
    fed the residual of a pass that ablated them already (the base's heads)."""
    plan = ablation_plan([sets[i] for i in chunk.set_indices])
    return {layer: pairs for layer, pairs in plan.items() if layer >= chunk.start_layer}


def residual_layers_of(chunks: Sequence[Chunk]) -> list[int]:
    """The layers after which chunks starting above layer 0 take the residual stream."""
    return sorted({chunk.start_layer - 1 for chunk in chunks if chunk.start_layer > 0})


def _cache_name(module: torch.nn.Module) -> str:
    """What the model calls its KV cache, as a forward argument and an output field."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _check_ablation(kind: str, epsilon: float, means: torch.Tensor | None) -> None:
    check_kind(kind)
    check_epsilon(epsilon)
    if kind == "mean" and means is None:
        raise UserError("a mean ablation needs reference means: call Engine.head_means(reference_prompts) first")


def _split_rows(group: list[int], rows: int) -> list[list[int]]:
    """`group` cut into runs of at most `rows` (at least one each)."""
    rows = max(1, rows)
    return [group[start : start + rows] for start in range(0, len(group), rows)]


def _by_set(values: torch.Tensor | None, n_sets: int, n_prompts: int) -> torch.Tensor | None:
    """[sets * prompts, width] readouts as float32 [sets, prompts, width] on the CPU."""
    values = _to_cpu_float(values)
    return None if values is None else values.view(n_sets, n_prompts, -1)


def _first_non_finite(start_layer: int, flags: Sequence[bool]) -> int | None:
    return next((start_layer + i for i, ok in enumerate(flags) if not ok), None)


def _count(stats: dict, rows: int, layers: int, flops: float) -> None:
    stats["traces"] += 1
    stats["rows"] += rows
    stats["layer_rows"] += rows * layers
    stats["flops"] += flops


def _to_cpu_float(values: torch.Tensor | None) -> torch.Tensor | None:
    if values is None:
        return None
    return values.detach().to(device="cpu", dtype=torch.float32).reshape(values.shape[0], -1)


def _finite(*values: torch.Tensor | None) -> bool:
    return all(v is None or bool(torch.isfinite(v).all()) for v in values)


def _report_non_finite(what: str, layer: int | None, dtype: torch.dtype) -> None:
    where = f"from layer {layer} on" if layer is not None else "after the last layer (final norm or unembedding)"
    advice = "rerun with --dtype float32" if dtype != torch.float32 else "check the model's weights (float32 already)"
    raise UserError(f"{what} produced non-finite values {where} (overflow in {str(dtype).removeprefix('torch.')}?); {advice}")


__all__ = ["Engine", "EngineConfig", "EngineResult", "Chunk", "ChunkResult", "Request", "RequestPart", "plan_chunks", "READOUTS", "KINDS"]
