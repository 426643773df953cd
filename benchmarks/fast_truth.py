"""Ground truth by generation, fast enough to run often: greedy answers of a model with head sets ablated by plain
PyTorch hooks, the same answers `safety_heads.demo.measure.generate` gives under `ground_truth.hooked`, with less work.

This is the study's reference side, so it stays independent of the library's ablation and engine code: the ablation
is `ground_truth.hooked` (forward hooks on the Hugging Face module), the loop below is plain greedy decoding with the
module's own forward and KV cache. Only the padding helper (`left_padded`) is shared, as in ground_truth.py.

Three savings:

1. **Early stop** (harmful sets, `stop_judges` given): a keyword judge calls an answer refused as soon as one of its
   phrases occurs anywhere in it, and more tokens never remove a phrase, so a row's verdict is settled once every
   listed judge sees one of its phrases in the answer so far. Such a row stops generating (`Answer.stopped`), keeping
   the shortened answer, and leaves the batch (its KV cache rows are dropped), so later steps run on fewer rows.
   The check uses each judge's own `refused` (its case handling, its apostrophe folding) on the decoded answer so
   far, so phrases spanning tokens are seen exactly when the decoded text holds them. This relies on decoding being
   prefix-consistent (the decoded text of a token prefix is a prefix of the full answer's, up to an incomplete
   trailing character): true of byte-level BPE (Qwen, Llama 3, the test models) and SentencePiece tokenizers.
   Harmless sets (the full answer is needed for its NLL) pass `stop_judges=None` and never stop early.
2. **Shared prefill**: an ablation at layers >= L leaves every layer below L clean, so the prompt pass through layers
   0..L-1 is the clean model's whatever the head set. It is computed once per prompt batch (`CleanPrefill`: each
   layer's output and KV entries); a head set whose lowest ablated layer is L replays those for layers 0..L-1
   (`Replay` stands in for the layer for one forward) and computes only layers L.. itself. The module's own forward
   still runs (masks, rotary embeddings, norm, head), so the replayed values are bitwise the ones it would compute.
   The prompts' common first tokens (the chat template's system prompt, 24 of about 41 tokens on Qwen) are one row
   of their own, computed once per head set, the rests left-padded after them (`Prompts`); this changes the
   prefill's float rounding (a different split of the same sums), not its math.
3. **Head sets decoded together**: on a CPU a decode step costs nearly as much for 2 rows as for 20 (it reads every
   weight), and after the early stop only the few rows that do not refuse keep generating; so the head sets of a
   prompt batch share one decode batch (rows = head sets x prompts, up to `decode_rows`), each row ablated by its
   own head set (`RowAblation`, the same product as `hooked`, per row).

Batches are formed as `generate` forms them (prompts sorted by length, `batch_size` at a time, left-padded), so every
prompt's prefill sees the same padding as in today's path.

    from fast_truth import truth_answers
    answers = truth_answers(module, tokenizer, [[], [(3, 1)], [(10, 4), (12, 0)]], tokens, 32, ("paper", "gcg"), 50)
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ground_truth import hooked  # noqa: E402  (the independent plain-hook ablation)

from safety_heads.ablation import DEFAULT_EPSILON  # noqa: E402
from safety_heads.batching import left_padded, split_shared_prefix  # noqa: E402
from safety_heads.errors import UserError  # noqa: E402
from safety_heads.judges import KEYWORD_JUDGES  # noqa: E402

HeadSet = list[tuple[int, int]]


@dataclass(frozen=True)
class Answer:
    """A greedy answer (decoded new tokens, special tokens skipped). `stopped`: generation ended early because every
    stop judge had already seen one of its refusal phrases, so `text` may be shorter than the full answer, whose
    verdict under those judges is the same."""

    text: str
    stopped: bool = False


@torch.no_grad()
def truth_answers(module, tokenizer, head_sets: list[HeadSet], tokens: list[list[int]], max_new_tokens: int,
                  stop_judges: tuple[str, ...] | None = None, batch_size: int = 50, *, kind: str = "ua",
                  epsilon: float = DEFAULT_EPSILON, share_lower_layers: bool = True, share_prefix: bool = True,
                  decode_rows: int = 256) -> list[list[Answer]]:
    """Greedy answers to every prompt in `tokens` (chat-formatted token ids) under every head set, each ablated by
    plain hooks as `ground_truth.hooked(module, heads, kind, head_dim, epsilon)` ablates it; result[s][p] answers
    prompt p under head set s. Llama-layout modules (Llama, Mistral, Qwen2), as `hooked`.

    `stop_judges`: names of keyword judges (safety_heads.judges.KEYWORD_JUDGES); a row stops once every one of them
    has seen a refusal phrase (its verdict can no longer change). None: every answer runs to `max_new_tokens` or the
    end-of-sequence token, exactly as `generate` does (harmless sets, whose full answers are scored).
    `batch_size`: prompts per prefill, batched by length as `generate` batches them. `decode_rows`: rows of one decode
    batch; the head sets of a prompt batch are decoded together up to it (rows = head sets x prompts, each row with
    its own ablation), so the few rows still generating after the early stop share each step.
    `share_lower_layers`: replay the clean prefill below each head set's lowest ablated layer (bitwise the same
    values). `share_prefix`: compute the prompts' common first tokens (the chat template's system prompt) once per
    head set and batch (a prompt's values then differ from a one-pass prefill by float rounding only). False for
    either computes it all, for checking. `head_dim` comes from the config and is checked against q_proj's width."""
    judges = stop_judge_list(stop_judges)
    check_plain_greedy(module)
    head_dim = checked_head_dim(module)
    n_layers = len(module.model.layers)
    check_head_sets(head_sets, n_layers, module.config.num_attention_heads)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))  # generate's batching: by length
    answers: list[list[Answer | None]] = [[None] * len(tokens) for _ in head_sets]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        prompts = Prompts.of([tokens[i] for i in rows], tokenizer.pad_token_id, share_prefix, module.device)
        clean = CleanPrefill.compute(module, prompts) if share_lower_layers else None
        per_decode = max(1, decode_rows // len(rows))
        for first in range(0, len(head_sets), per_decode):
            group = list(range(first, min(first + per_decode, len(head_sets))))
            logits, caches = [], []
            for index in group:
                lowest = min((layer for layer, _ in head_sets[index]), default=n_layers)
                with hooked(module, head_sets[index], kind, head_dim, epsilon):
                    set_logits, cache = prefill(module, prompts, clean, lowest)
                logits.append(set_logits)
                caches.append(cache)
            row_heads = [head_sets[index] for index in group for _ in rows]
            with RowAblation(module, row_heads, kind, head_dim, epsilon) as ablation:
                found = decode(module, tokenizer, prompts.mask.repeat(len(group), 1),
                               prompts.last_positions.repeat(len(group), 1), torch.cat(logits), merged(module, caches),
                               max_new_tokens, judges, ablation.select)
            for offset, index in enumerate(group):
                for row, answer in zip(rows, found[offset * len(rows) : (offset + 1) * len(rows)]):
                    answers[index][row] = answer
    return answers  # type: ignore[return-value]


def stop_judge_list(names: tuple[str, ...] | None) -> list:
    """The keyword judges named, or a clear error for a name that is not one (model judges cannot stop a row)."""
    if names is None:
        return []
    unknown = [name for name in names if name not in KEYWORD_JUDGES]
    if unknown or not names:
        raise UserError(f"stop judges must be keyword judges ({', '.join(KEYWORD_JUDGES)}), not {list(unknown or names)}")
    return [KEYWORD_JUDGES[name] for name in names]


def check_head_sets(head_sets: list[HeadSet], n_layers: int, n_heads: int) -> None:
    """Every head exists and none is listed twice in a set (`hooked` would scale it twice)."""
    for heads in head_sets:
        bad = [(layer, head) for layer, head in heads if not (0 <= layer < n_layers and 0 <= head < n_heads)]
        if bad:
            raise UserError(f"head {bad[0][0]}:{bad[0][1]} does not exist ({n_layers} layers x {n_heads} heads)")
        if len(set(map(tuple, heads))) != len(heads):
            raise UserError(f"a head set lists a head twice: {sorted(heads)}")


def checked_head_dim(module) -> int:
    config = module.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = module.model.layers[0].self_attn.q_proj.out_features
    if width != head_dim * config.num_attention_heads:
        raise UserError(f"q_proj has {width} outputs, not {config.num_attention_heads} heads x {head_dim}")
    return head_dim


def check_plain_greedy(module) -> None:
    """`generate` applies the module's generation config (repetition penalty, banned n-grams, ...) even when greedy;
    the loop here does plain argmax, so it refuses a module whose config would make `generate` differ."""
    config = module.generation_config
    changed = {
        "repetition_penalty": (config.repetition_penalty or 1.0) != 1.0,
        "no_repeat_ngram_size": bool(config.no_repeat_ngram_size),
        "bad_words_ids": bool(config.bad_words_ids),
        "suppress_tokens": bool(config.suppress_tokens) or bool(config.begin_suppress_tokens),
        "min_new_tokens": bool(config.min_new_tokens) or bool(config.min_length),
        "forced tokens": config.forced_bos_token_id is not None or config.forced_eos_token_id is not None,
        "sequence_bias": bool(getattr(config, "sequence_bias", None)),
    }
    if any(changed.values()):
        names = ", ".join(name for name, is_set in changed.items() if is_set)
        raise UserError(f"the module's generation config sets {names}; fast_truth's plain greedy loop would differ from generate")


# -- the prefill: a shared prefix and shared clean lower layers -------------------------------------------------------


@dataclass
class Prompts:
    """One prompt batch as the forward passes that prefill it: the prompts' common first tokens as one row, then the
    rests left-padded after them (positions continuing); or, without a shared prefix, one left-padded pass."""

    passes: list[dict]  # model inputs of each pass (input_ids, attention_mask, position_ids)
    rows: int
    mask: torch.Tensor  # [rows, prompt tokens]: the attention mask decoding extends
    last_positions: torch.Tensor  # [rows, 1]: each row's last prompt position

    @classmethod
    def of(cls, token_lists: list[list[int]], pad_id: int, share_prefix: bool = True, device="cpu") -> Prompts:
        shared = split_shared_prefix(token_lists, pad_id, range(len(token_lists))) if share_prefix else None
        if shared is None:
            batch = left_padded(token_lists, pad_id)
            passes = [dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)]
        else:
            batch = shared.rest  # its mask spans prefix + rest, its positions continue from the prefix
            passes = [shared.prefix_inputs,
                      dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)]
        passes = [{name: value.to(device) for name, value in inputs.items()} for inputs in passes]
        return cls(passes, len(token_lists), batch.attention_mask.to(device), batch.position_ids[:, -1:].to(device))


@dataclass
class CleanPass:
    """The clean model's values in one prefill pass: every decoder layer's output and the KV entries it added."""

    outputs: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class CleanPrefill:
    passes: list[CleanPass]

    @classmethod
    def compute(cls, module, prompts: Prompts) -> CleanPrefill:
        cache = DynamicCache(config=module.config)
        passes = []
        for number, inputs in enumerate(prompts.passes):
            if number:
                widen(cache, prompts.rows)
            before = [layer.get_seq_length() for layer in cache.layers]
            outputs: list[torch.Tensor] = []
            handles = [layer.register_forward_hook(lambda mod, args, output, kept=outputs: kept.append(output))
                       for layer in module.model.layers]
            try:
                module(**inputs, **{cache_argument(module): cache}, use_cache=True, logits_to_keep=1)
            finally:
                for handle in handles:
                    handle.remove()
            passes.append(CleanPass(outputs, [layer.keys[..., start:, :] for layer, start in zip(cache.layers, before)],
                                    [layer.values[..., start:, :] for layer, start in zip(cache.layers, before)]))
        return cls(passes)


def widen(cache, rows: int) -> None:
    """The one-row cache of a shared prefix, repeated for every prompt of the batch."""
    for layer in cache.layers:
        layer.batch_repeat_interleave(rows)


class Replay(torch.nn.Module):
    """Stands in for decoder layer `index` during one prefill pass: appends the clean pass's KV entries to the cache
    and returns the clean output, computing nothing."""

    def __init__(self, clean: CleanPass, index: int):
        super().__init__()
        self.clean, self.index = clean, index

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # the argument's name before transformers 5.2x
        cache.update(self.clean.keys[self.index], self.clean.values[self.index], self.index)
        return self.clean.outputs[self.index]


def prefill(module, prompts: Prompts, clean: CleanPrefill | None, lowest: int):
    """The prompt passes under whatever hooks are registered: last-position logits and the filled KV cache. Layers
    below `lowest` are replayed from `clean` (none when `clean` is None)."""
    cache = DynamicCache(config=module.config)
    for number, inputs in enumerate(prompts.passes):
        if number:
            widen(cache, prompts.rows)
        logits = replaying(module, inputs, cache, clean.passes[number] if clean else None, lowest)
    return logits, cache


def replaying(module, inputs: dict, cache, clean: CleanPass | None, lowest: int) -> torch.Tensor:
    """One forward pass of the module with layers below `lowest` replayed from `clean`; last-position logits."""
    layers = module.model.layers
    replaced = {index: layers[index] for index in range(lowest if clean is not None else 0)}
    try:
        for index in replaced:
            layers[index] = Replay(clean, index)
        return module(**inputs, **{cache_argument(module): cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
    finally:
        for index, layer in replaced.items():
            layers[index] = layer


def merged(module, caches: list) -> DynamicCache:
    """The caches of several head sets' prefills, one after another along the batch."""
    cache = DynamicCache(config=module.config)
    for index in range(len(caches[0].layers)):
        cache.update(torch.cat([c.layers[index].keys for c in caches]),
                     torch.cat([c.layers[index].values for c in caches]), index)
    return cache


# -- the decode loop: rows with their own ablation, early stop, a shrinking batch -------------------------------------


class RowAblation:
    """Plain hooks that ablate, in each row of a batch, that row's heads: the same product `hooked` takes (`ua`: the
    head's slice of the q_proj output times epsilon, `sc`: its slice of the o_proj input), per row. `select` follows
    the batch when rows leave it."""

    def __init__(self, module, row_heads: list[HeadSet], kind: str, head_dim: int, epsilon: float):
        self.module, self.kind, self.head_dim = module, kind, head_dim
        n_heads = module.config.num_attention_heads
        self.scales: dict[int, torch.Tensor] = {}
        for row, heads in enumerate(row_heads):
            for layer, head in heads:
                scale = self.scales.setdefault(layer, torch.ones(len(row_heads), n_heads, head_dim))
                scale[row, head] = epsilon
        self.handles: list = []

    def scaled(self, layer: int, tensor: torch.Tensor) -> torch.Tensor:
        scale = self.scales[layer].to(tensor.device, tensor.dtype).flatten(1)[:, None, :]  # [rows, 1, heads * head_dim]
        return tensor * scale

    def select(self, index: torch.Tensor) -> None:
        self.scales = {layer: scale[index.cpu()] for layer, scale in self.scales.items()}

    def __enter__(self) -> RowAblation:
        for layer in self.scales:
            attention = self.module.model.layers[layer].self_attn
            if self.kind == "ua":
                self.handles.append(attention.q_proj.register_forward_hook(
                    lambda mod, args, output, layer=layer: self.scaled(layer, output)))
            else:
                self.handles.append(attention.o_proj.register_forward_pre_hook(
                    lambda mod, args, layer=layer: (self.scaled(layer, args[0]), *args[1:])))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def decode(module, tokenizer, mask: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor, cache,
           max_new_tokens: int, judges: list, select=None) -> list[Answer]:
    """Greedy steps after the prefill (`logits`: each row's last-position logits), as `generate` takes them (argmax,
    stop at the end-of-sequence token or after `max_new_tokens`); a row leaves the batch when it ends or when every
    judge in `judges` calls its answer so far refused, and `select` hears which rows stay. Answers in row order."""
    size = logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(size)]
    stopped = [False] * size
    alive = list(range(size))  # rows still generating, in the order of the tensors' rows
    cache_key = cache_argument(module)  # once, not per step
    for step in range(max_new_tokens):
        next_tokens = logits.argmax(-1)
        keep = []
        for slot, row in enumerate(alive):
            token = int(next_tokens[slot])
            generated[row].append(token)
            if token == tokenizer.eos_token_id or step == max_new_tokens - 1:
                continue
            if judges and all(judge.refused(answer_text(tokenizer, generated[row])) for judge in judges):
                stopped[row] = True
                continue
            keep.append(slot)
        if not keep:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=logits.device)
            for layer in cache.layers:
                layer.batch_select_indices(index)
            mask, positions, next_tokens = mask[index], positions[index], next_tokens[index]
            alive = [alive[slot] for slot in keep]
            if select is not None:
                select(index)
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        positions = positions + 1
        logits = module(input_ids=next_tokens[:, None], attention_mask=mask, position_ids=positions,
                        **{cache_key: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
    return [Answer(answer_text(tokenizer, ids), stopped[row]) for row, ids in enumerate(generated)]


def cache_argument(module) -> str:
    """The forward argument that takes the KV cache: `cache` in recent transformers, `past_key_values` before (the
    engine's own check, kept here so this reference side imports nothing from the engine)."""
    forward = getattr(module, "forward", module)  # a test's scripted stand-in is a plain callable
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def answer_text(tokenizer, ids: list[int]) -> str:
    """Decoded as `generate`'s caller decodes (special tokens skipped, so the end-of-sequence token is dropped)."""
    return tokenizer.decode(ids, skip_special_tokens=True)
