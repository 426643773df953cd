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

Nothing here knows about Ships or Sahara; nothing above this module builds nnsight traces.

    python benchmarks/bench_engine.py
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import nnsight
import torch

from .ablation import KINDS, Head, ablate_layer, ablation_plan, check_epsilon, check_kind
from .errors import UserError
from .models import LoadedModel, layer_part, resolve

READOUTS = ("logits", "hidden")

# The fixed cost of one trace, in floating-point operations of model compute it is worth (measured roughly: ~2 ms of
# Python and nnsight bookkeeping per trace, against a CPU doing ~5e10 flop/s and a GPU ~1e13 on these shapes). It only
# steers how head sets are grouped into chunks; results do not depend on it.
TRACE_OVERHEAD_FLOPS = {"cpu": 3e8, "cuda": 2e10}
DEFAULT_CPU_BUDGET_MB = 2048
MAX_PADDING_SHARE = 0.15  # a prompt group stops growing before padding exceeds this share of its positions
GPU_BUDGET_FRACTION = 0.5


@dataclass
class EngineConfig:
    """How the engine batches. Shared by the command line and the Python API."""

    memory_budget_mb: float | None = None  # activation memory per forward pass; None = 2 GiB on CPU, half of free GPU memory
    max_batch_rows: int | None = None  # hard cap on rows per forward pass, on top of the budget
    prefix_reuse: bool = True
    # False: run here. True: run on NDIF. "local": nnsight's simulation of a remote request (serialise the trace,
    # deserialise, run here) -- the offline proof that the in-trace code travels.
    remote: bool | str = False

    def validate(self) -> None:
        if self.memory_budget_mb is not None and not (self.memory_budget_mb > 0 and math.isfinite(self.memory_budget_mb)):
            raise UserError(f"--memory-budget must be a positive number of MB, not {self.memory_budget_mb!r}")
        if self.max_batch_rows is not None and self.max_batch_rows < 1:
            raise UserError(f"--max-batch-rows must be at least 1, not {self.max_batch_rows!r}")


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
class Batch:
    """Prompts left-padded into one tensor: the last position is every row's last prompt token."""

    prompt_indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

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


def left_padded(token_lists: Sequence[Sequence[int]], pad_id: int | None, indices: Sequence[int] | None = None) -> Batch:
    """Left-pad token lists; positions count real tokens only, so a padded row is positioned exactly as it would be alone."""
    length = max(len(ids) for ids in token_lists)
    input_ids = torch.full((len(token_lists), length), 0 if pad_id is None else pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), length), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, length - len(ids) :] = torch.tensor(list(ids))
        attention_mask[row, length - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(list(indices if indices is not None else range(len(token_lists))), input_ids, attention_mask, position_ids)


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
        hf_config = model.module.config
        self.d_model = hf_config.hidden_size if hasattr(hf_config, "hidden_size") else hf_config.n_embd
        self.context_length = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)

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

    def _device_kind(self) -> str:
        return "cuda" if self.model.device.type == "cuda" else "cpu"

    def _budget_bytes(self) -> float:
        if self.config.memory_budget_mb is not None:
            return self.config.memory_budget_mb * 2**20
        if self._device_kind() == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            return free * GPU_BUDGET_FRACTION
        return DEFAULT_CPU_BUDGET_MB * 2**20

    def bytes_per_row(self, length: int) -> float:
        """Peak activation memory of one row of one forward pass, roughly (no gradients are kept)."""
        hf_config = self.model.module.config
        intermediate = getattr(hf_config, "intermediate_size", None) or 4 * self.d_model
        itemsize = torch.finfo(self.model.dtype).bits // 8
        per_position = 12 * self.d_model + 4 * intermediate + 3 * self.layout.n_heads * length
        return length * per_position * itemsize + 2 * hf_config.vocab_size * 4

    def max_rows(self, length: int) -> int:
        rows = int(self._budget_bytes() // self.bytes_per_row(length))
        if self.config.max_batch_rows is not None:
            rows = min(rows, self.config.max_batch_rows)
        return max(rows, 1)

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

    def _clean_pass(self, batch: Batch, residual_layers: set[int], readouts: tuple[str, ...]):
        lm, layout = self.model.lm, self.layout
        layers = resolve(lm, layout.layers_path)
        # Only values saved inside a trace exist after it: save containers, fill them with raw values.
        with torch.no_grad(), lm.trace(**batch.repeated(1), logits_to_keep=1, use_cache=False, remote=self.config.remote):
            residuals = nnsight.save({})
            readout = nnsight.save({})
            for layer in sorted(residual_layers):
                residuals[layer] = layers[layer].output
            _read_last_position(lm, layout, readouts, readout)
        return residuals, _to_cpu_float(readout.get("logits")), _to_cpu_float(readout.get("hidden"))

    def _ablated_pass(self, batch: Batch, chunk: Chunk, sets, residual, kind, epsilon, means, readouts, check_layers=False):
        lm, layout = self.model.lm, self.layout
        n_sets = len(chunk.set_indices)
        plan = ablation_plan([sets[i] for i in chunk.set_indices])
        layers = resolve(lm, layout.layers_path)
        with torch.no_grad(), lm.trace(**batch.repeated(n_sets), logits_to_keep=1, use_cache=False, remote=self.config.remote):
            if chunk.start_layer > 0:
                skipped_output = residual.repeat(n_sets, 1, 1)
                for layer in range(chunk.start_layer):
                    layers[layer].skip(skipped_output)
            finite = nnsight.save([])
            for layer in range(chunk.start_layer, layout.n_layers) if check_layers else sorted(plan):
                if layer in plan:
                    ablate_layer(lm, layout, layer, plan[layer], n_sets, kind, epsilon, means, repeat=batch.size)
                if check_layers:  # diagnosis only: which layer's output first stops being finite
                    finite.append(bool(torch.isfinite(layers[layer].output).all()))
            readout = nnsight.save({})
            _read_last_position(lm, layout, readouts, readout)
        if check_layers:
            return next((chunk.start_layer + i for i, ok in enumerate(finite) if not ok), None)

        def by_set(values):
            values = _to_cpu_float(values)
            return None if values is None else values.view(n_sets, batch.size, -1)

        return by_set(readout.get("logits")), by_set(readout.get("hidden"))

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
        check_kind(kind)
        check_epsilon(epsilon)
        readouts = tuple(readouts)
        if not readouts or any(r not in READOUTS for r in readouts):
            raise ValueError(f"readouts must be a non-empty subset of {READOUTS}")
        if kind == "mean" and means is None:
            raise UserError("a mean ablation needs reference means: call Engine.head_means(reference_prompts) first")
        tokens = self.tokenize(prompts)
        sets = self._normalise_sets(head_sets)
        stats = stats if stats is not None else {}
        for key in ("traces", "rows", "layer_rows"):
            stats.setdefault(key, 0)
        n_layers = self.layout.n_layers
        # Empty head sets are the clean model: served from the clean pass, never run again.
        active = [i for i, heads in enumerate(sets) if heads]
        first_layers = [sets[i][0][0] for i in active]
        for group in self._prompt_groups(tokens):
            batch = self._batch(tokens, group)
            max_sets = max(1, self.max_rows(batch.length) // batch.size)
            plan = plan_chunks(
                first_layers, n_layers, batch.size, max_sets, self._overhead_layer_rows(batch.length), self.config.prefix_reuse
            )
            plan = [Chunk(tuple(active[i] for i in chunk.set_indices), chunk.start_layer) for chunk in plan]
            residual_layers = {chunk.start_layer - 1 for chunk in plan if chunk.start_layer > 0}
            residuals, clean_logits, clean_hidden = self._clean_pass(batch, residual_layers, readouts)
            if not _finite(clean_logits, clean_hidden):
                layer = self._ablated_pass(batch, Chunk((0,), 0), [()], None, kind, epsilon, means, readouts, check_layers=True)
                _report_non_finite("the clean model", layer, self.model.dtype)
            stats["traces"] += 1
            stats["rows"] += batch.size
            stats["layer_rows"] += batch.size * n_layers
            yield "clean", ChunkResult(group, (), clean_logits, clean_hidden)
            for chunk in plan:
                logits, hidden = self._ablated_pass(
                    batch, chunk, sets, residuals.get(chunk.start_layer - 1), kind, epsilon, means, readouts
                )
                if not _finite(logits, hidden):
                    residual = residuals.get(chunk.start_layer - 1)
                    layer = self._ablated_pass(batch, chunk, sets, residual, kind, epsilon, means, readouts, check_layers=True)
                    _report_non_finite("an ablated model", layer, self.model.dtype)
                rows = len(chunk.set_indices) * batch.size
                stats["traces"] += 1
                stats["rows"] += rows
                stats["layer_rows"] += rows * (n_layers - chunk.start_layer)
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

    def head_means(self, prompts: Sequence[str | Sequence[int]]) -> torch.Tensor:
        """Mean of every head's output (the output projection's input) over all real tokens of `prompts`.

        Returns [n_layers, n_heads * head_dim] in float32: the reference for `mean` ablation. Padding is excluded.
        """
        lm, layout = self.model.lm, self.layout
        tokens = self.tokenize(prompts)
        total = torch.zeros(layout.n_layers, layout.n_heads * layout.head_dim, dtype=torch.float64)
        count = 0
        for group in self._prompt_groups(tokens):
            batch = self._batch(tokens, group)
            with torch.no_grad(), lm.trace(**batch.repeated(1), logits_to_keep=1, use_cache=False, remote=self.config.remote):
                sums = []
                for layer in range(layout.n_layers):
                    site = layer_part(lm, layout, layer, layout.output_path).input
                    weights = batch.attention_mask.to(device=site.device, dtype=site.dtype).unsqueeze(-1)
                    sums.append((site * weights).double().sum(dim=(0, 1)))
                sums = nnsight.save(torch.stack(sums))
            total += sums.cpu()
            count += int(batch.attention_mask.sum())
        return (total / count).float()


def _read_last_position(lm, layout, readouts, into: dict) -> None:
    """Inside a trace: the final-norm hidden state and the logits at the last position (the norm runs first)."""
    if "hidden" in readouts:
        into["hidden"] = resolve(lm, layout.final_norm_path).output[:, -1]
    if "logits" in readouts:
        into["logits"] = lm.output.logits[:, -1]


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


__all__ = ["Engine", "EngineConfig", "EngineResult", "Chunk", "ChunkResult", "plan_chunks", "READOUTS", "KINDS"]
