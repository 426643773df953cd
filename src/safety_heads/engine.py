"""The hot path: last-token readouts for many (prompt, head set) pairs in few forward passes.

Given prompts, a list of head sets and an `Ablation` (kind, epsilon, means), `Engine.run` returns the last-position
logits and/or the last-position hidden state after the final norm, for every pair, plus the clean (unablated)
readouts. Row r of a pass ablates head set r plus `ablation.heads` (usually empty here; an empty set with no extra
heads is the clean model). How:

- **Head sets on the batch axis.** One forward pass carries many copies of a prompt; row r ablates its own head set
  through per-layer masks built inside the trace from small (row, head) index lists (ablation.ablation_pairs).
- **Prefix reuse.** Layers below a head set's first ablated layer compute exactly what the clean model computes. One
  clean pass saves the residual stream; a chunk whose head sets all start at layer l skips layers 0..l-1 and feeds the
  saved residual into layer l. Head sets are sorted by first layer and cut into chunks by a small cost model
  (batching.plan_chunks: a trace has a fixed cost, a layer evaluation a per-row cost), so tiny models get one big
  trace and large ones reuse prefixes. A prompt group's chunks are its `GroupSchedule` (schedule.py).
- **Memory budget.** Rows per forward pass are capped from an estimate of activation memory per row.
- **Padding.** Prompts of different lengths batch together, left-padded (batching.py), with position ids that count
  real tokens only, so each row sees exactly what it would alone; `logits_to_keep=1` materialises only the last
  position.
- **One execution path.** Every call's passes are packed into requests (remote_requests.py) whose body is one
  function of intrace.py, `request_results`: here the engine iterates it (each chunk's readouts as its pass ends),
  with `EngineConfig.remote` NDIF runs it (few requests, each collecting its results). execution.py decides, once,
  which; remote_requests.py alone counts passes and FLOPs and checks that readouts are finite.

Nothing here knows about Ships or Sahara; nothing above the engine layer builds nnsight traces.

    python benchmarks/bench_engine.py
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from . import intrace
from .ablation import Ablation, AblationConfig, Head, ablation_pairs, require_means
from .batching import Batch, Chunk, left_padded, split_rows
from .engine_config import HIDDEN_READOUTS, EngineConfig  # noqa: F401 - EngineConfig, HIDDEN_READOUTS are imported from here
from .errors import UserError
from .execution import TraceRunner
from .flops import flop_model
from .models import LoadedModel, resolve
from .readouts import ChunkResult
from .remote_requests import stream_requests
from .schedule import GroupSchedule, schedule_groups

READOUTS = ("logits", "hidden")
Prompts = Sequence[str | Sequence[int]]  # strings (tokenised with the tokenizer's defaults) or token id lists
HeadSets = Sequence[Sequence[Head]]

# The fixed cost of one trace, in floating-point operations of model compute it is worth (measured roughly: ~2 ms of
# Python and nnsight bookkeeping per trace, against a CPU doing ~5e10 flop/s and a GPU ~1e13 on these shapes). It only
# steers how head sets are grouped into chunks; results do not depend on it.
TRACE_OVERHEAD_FLOPS = {"cpu": 3e8, "cuda": 2e10}
DEFAULT_CPU_BUDGET_MB = 2048
# NDIF: the server's free memory is unknown here. 16 GiB of activations per forward pass fits beside a 7-13B bf16
# model on one 80 GB GPU; --memory-budget overrides it.
DEFAULT_REMOTE_BUDGET_MB = 16384
MAX_PADDING_SHARE = 0.15  # a prompt group stops growing before padding exceeds this share of its positions
GPU_BUDGET_FRACTION = 0.5


@dataclass
class EngineResult:
    """Readouts for every (prompt, head set) pair, in float32 on the CPU. Missing readouts are None."""

    logits: torch.Tensor | None  # [prompts, head sets, vocab]
    hidden: torch.Tensor | None  # [prompts, head sets, d_model], after the final norm
    clean_logits: torch.Tensor | None  # [prompts, vocab]
    clean_hidden: torch.Tensor | None  # [prompts, d_model]
    stats: dict = field(default_factory=dict)  # traces run, rows, layer evaluations: what the benchmarks report



class Engine:
    """Batched, exact head ablation for one loaded model."""

    def __init__(self, model: LoadedModel, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.layout = model.layout
        # What in-trace code needs, as plain data (intrace.py), and the name the model gives its KV cache argument
        # and output field (transformers renamed past_key_values to cache).
        self.sites = {**model.layout.trace_sites(), "cache_name": _cache_name(model.module),
                      "hidden_readout": self.config.hidden_readout}
        self.runner = TraceRunner(model, self.sites, self.config)  # here or remote: execution.py decides
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

    def batch(self, tokens: list[list[int]], indices: list[int], base: tuple = ()) -> Batch:
        """Prompts `indices` of `tokens`, left-padded into one batch; `base`: the heads every set of the call ablates."""
        return replace(left_padded([tokens[i] for i in indices], self.model.tokenizer.pad_token_id, indices), base=tuple(base))

    def normalise_sets(self, head_sets: Sequence[Sequence[Head]], extra: Sequence[Head] = ()) -> list[tuple[Head, ...]]:
        """Each set plus `extra` (an Ablation's own heads), as sorted unique (layer, head) pairs checked against the
        model."""
        normalised = []
        for heads in head_sets:
            unique = tuple(sorted({(int(layer), int(head)) for layer, head in (*heads, *extra)}))
            for layer, head in unique:
                self.layout.check_head(layer, head)
            normalised.append(unique)
        return normalised

    # -- sizing ------------------------------------------------------------------------------------------------

    @property
    def remote(self) -> bool:
        """Whether traces run as remote requests (TraceRunner.remote)."""
        return self.runner.remote

    @property
    def on_server(self) -> bool:
        """Whether the forward passes run on a remote server (whose GPUs we size for), not on this machine."""
        return self.runner.on_server

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

    def pass_flops(self, batch: Batch, chunk: Chunk | None) -> float:
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

    def overhead_layer_rows(self, length: int) -> float:
        """A trace's fixed cost in units of one layer evaluated on one row."""
        layer = resolve(self.model.module, self.layout.layers_path)[0]
        params = sum(p.numel() for p in layer.parameters())
        flops = 2 * length * params + 4 * length * length * self.layout.n_heads * self.layout.head_dim
        return TRACE_OVERHEAD_FLOPS[self._device_kind()] / max(flops, 1)

    def prompt_groups(self, tokens: list[list[int]]) -> list[list[int]]:
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

    def group_schedules(self, tokens: list[list[int]], sets: list[tuple[Head, ...]]) -> list[GroupSchedule]:
        """Per prompt group: its padded batch and its chunks (schedule.py)."""
        return schedule_groups(self, tokens, sets)


    def means_for(self, means: torch.Tensor | None, layers) -> dict | None:
        """Only the reference means of the layers a pass ablates, in the model's dtype (what the in-trace edit
        converts to anyway): all a remote request needs to carry."""
        return None if means is None else {layer: means[layer].to(self.model.dtype) for layer in sorted(layers)}

    # -- public ------------------------------------------------------------------------------------------------

    def stream(self, prompts: Prompts, head_sets: HeadSets, *, ablation: Ablation = Ablation(),
               readouts: Sequence[str] = ("logits",), stats: dict | None = None) -> Iterator[tuple[str, ChunkResult]]:
        """Yield ("clean", ...) once per prompt group, then ("ablated", ...) per chunk, as they finish. Set i
        ablates head_sets[i] plus `ablation.heads`."""
        require_means(ablation)
        readouts = tuple(readouts)
        if not readouts or any(r not in READOUTS for r in readouts):
            raise ValueError(f"readouts must be a non-empty subset of {READOUTS}")
        tokens = self.tokenize(prompts)
        sets = self.normalise_sets(head_sets, ablation.heads)
        stats = stats if stats is not None else {}
        for key in ("traces", "rows", "layer_rows", "flops"):
            stats.setdefault(key, 0)
        yield from stream_requests(self, self.group_schedules(tokens, sets), sets, ablation, readouts, stats)

    def run(self, prompts: Prompts, head_sets: HeadSets, *, ablation: Ablation = Ablation(),
            readouts: Sequence[str] = ("logits",)) -> EngineResult:
        """Readouts for every (prompt, head set) pair, set i ablating head_sets[i] plus `ablation.heads`; see the
        module docstring for how they are batched."""
        readouts = tuple(readouts)
        n_prompts, n_sets = len(prompts), len(head_sets)
        stats: dict = {}
        out: dict[str, torch.Tensor] = {}
        clean: dict[str, torch.Tensor] = {}
        empty_sets = [i for i, heads in enumerate(head_sets) if len(heads) == 0 and not ablation.heads]  # the clean model
        for what, part in self.stream(prompts, head_sets, ablation=ablation, readouts=readouts, stats=stats):
            for name, values in (("logits", part.logits), ("hidden", part.hidden)):
                if values is None:
                    continue
                target = out.setdefault(name, torch.empty(n_prompts, n_sets, values.shape[-1]))
                if what == "clean":
                    clean.setdefault(name, torch.empty(n_prompts, values.shape[-1]))[part.prompt_indices] = values
                    for set_index in empty_sets:
                        target[part.prompt_indices, set_index] = values
                else:
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

    def ablated_token_log_probs(self, sequences: Sequence[Sequence[int]], head_sets: HeadSets, last: int, *,
                                ablation: Ablation = Ablation()) -> torch.Tensor:
        """log p of each sequence's `last` final tokens (teacher-forced) with each head set (plus `ablation.heads`)
        ablated: [sets, sequences, last] float32, NaN where a sequence has fewer than `last` + 1 tokens (its first
        token has no prediction). An empty set (and no `ablation.heads`) is the clean model. Used by Sahara's harmless
        guard (how likely the ablated model finds the clean model's own answers) and, with the empty set, by
        `token_log_probs`. No prefix reuse: every layer runs for every set. Only the picked values leave the trace."""
        require_means(ablation)
        if last < 1:
            raise ValueError(f"last must be at least 1, not {last}")
        tokens = self.tokenize(sequences)
        sets = self.normalise_sets(head_sets, ablation.heads)
        vocabulary = self.model.lm.config.get_text_config().vocab_size
        result = torch.empty(len(sets), len(tokens), last)
        requests = 0
        for group in self.prompt_groups(tokens):
            # a row holds one layer's activations and, at the end, [last + 1, vocabulary] logits and their log-softmax
            length = max(len(tokens[group[-1]]), last + 1)  # groups are sorted by length
            rows = max(1, int(self._budget_bytes() // (self.bytes_per_row(length) + 8 * vocabulary * (last + 1))))
            if self.config.max_batch_rows is not None:
                rows = min(rows, self.config.max_batch_rows)
            for part in split_rows(group, rows):
                batch = left_padded([tokens[i] for i in part], self.model.tokenizer.pad_token_id, part, min_length=last + 1)
                max_sets = max(1, rows // batch.size)
                for start in range(0, len(sets), max_sets):
                    chunk = sets[start : start + max_sets]
                    pairs = ablation_pairs(chunk)
                    requests += 1
                    values = self.runner.run(
                        intrace.token_log_probs, self.runner.inputs(batch.repeated(1)), pairs, len(chunk),
                        ablation.in_trace(self.means_for(ablation.means, pairs)), last,
                        label=f"answer-scoring request {requests}")
                    values = values.float().cpu().reshape(len(chunk), batch.size, last)
                    result[start : start + len(chunk), batch.prompt_indices] = values
        for index, ids in enumerate(tokens):
            result[:, index, : max(0, last + 1 - len(ids))] = float("nan")  # predictions of padding, not of the sequence
        return result

    def head_means(self, prompts: Sequence[str | Sequence[int]]) -> torch.Tensor:
        """Mean of every head's output (the output projection's input) over all real tokens of `prompts`.

        Returns [n_layers, n_heads * head_dim] in float32: the reference for `mean` ablation. Padding is excluded.
        A remote run sends a forward pass per request: the sums are all that comes back.
        """
        layout = self.layout
        tokens = self.tokenize(prompts)
        total = torch.zeros(layout.n_layers, layout.n_heads * layout.head_dim, dtype=torch.float64)
        count = 0
        batches = [self.batch(tokens, group) for group in self.prompt_groups(tokens)]
        for number, batch in enumerate(batches, start=1):
            sums = self.runner.run(intrace.head_sums, self.runner.inputs(batch.repeated(1)),
                                   label=f"reference-mean request {number} of {len(batches)}")
            total += sums.cpu()
            count += int(batch.attention_mask.sum())
        return (total / count).float()

    def ablation(self, setting: AblationConfig, template: str, system: str | None = None) -> Ablation:
        """The Ablation `setting` describes on this model: for kind ``mean``, with the mean head outputs of its
        reference prompts, formatted as the run's own (`template`, `system`). The one place means are computed."""
        means = None
        if setting.kind == "mean":
            from .data import prompt_tokens

            means = self.head_means(prompt_tokens(setting.mean_reference, setting.mean_reference_limit, template,
                                                  self.model.tokenizer, system))
        return setting.ablation(means=means)


def _cache_name(module: torch.nn.Module) -> str:
    """What the model calls its KV cache, as a forward argument and an output field."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


__all__ = ["Engine", "EngineConfig", "EngineResult", "READOUTS", "HIDDEN_READOUTS"]
