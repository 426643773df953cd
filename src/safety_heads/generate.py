"""Batched generation with an ablation active at every step.

One nnsight `generate` per batch of queries: left-padded, KV cache on, and the ablation applied to every forward
pass of the generation (`tracer.all()`), not only to the prompt. Without the per-step loop an edit reaches only the
prompt's pass; the prompt's edited KV cache then leaks part of the effect into later steps, so greedy tokens can
even agree while the logits do not (nnsight.md §5) -- tests compare logits at every step against a surgically
edited model instead.

Each row may carry its own head set (the per-query mode of evaluation ablates each query's own top Ships heads);
`ablation.heads` are ablated in every row. execution.TraceRunner runs each batch here or as one remote request.

    safety-heads evaluate --model tiny --dataset maliciousinstruct --limit 4 --heads 0:1,1:3 --out runs/eval
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import intrace
from .ablation import Ablation, Head, ablation_pairs, require_means
from .batching import left_padded
from .checked import Checked
from .errors import UserError
from .models import LoadedModel


@dataclass
class GenerationConfig(Checked):
    """Decoding settings. Shared by the command line and the Python API."""

    max_new_tokens: int = 64  # the paper used 128
    do_sample: bool = False  # greedy by default, for reproducibility
    top_k: int | None = None  # the paper's sampling used top-k 5
    top_p: float | None = None
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, not {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k-sampling must be at least 1, not {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must lie in (0, 1], not {self.top_p}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UserError(f"--temperature must be a positive number, not {self.temperature}")


@dataclass
class Generation:
    token_ids: list[int]  # new tokens only, cut at the first end-of-sequence token
    text: str
    logits: torch.Tensor | None = None  # [steps, vocab] float32, when asked for


def generate(
    model: LoadedModel,
    token_lists: Sequence[Sequence[int]],
    *,
    head_sets: Sequence[Sequence[Head]] | None = None,
    ablation: Ablation = Ablation(),
    config: GenerationConfig | None = None,
    keep_logits: bool = False,
    remote: bool | str = False,
    engine=None,
) -> list[Generation]:
    """Generate an answer for each prompt; row i ablates `head_sets[i]` (None or [] = nothing) plus `ablation.heads`
    at every step, as `ablation` says (kind, epsilon, means).

    Remote (`remote`, or an `engine` whose EngineConfig says remote, which also carries the retry settings): one
    request per batch of `config.batch_size` prompts, all steps on the server; only the token ids (and the logits,
    with `keep_logits`) come back.
    """
    config = config or GenerationConfig()
    if head_sets is not None and len(head_sets) != len(token_lists):
        raise ValueError("one head set per prompt")
    sets = [list(head_sets[i]) if head_sets is not None else [] for i in range(len(token_lists))]
    sets = [heads + [head for head in ablation.heads if head not in heads] for heads in sets]
    if any(sets):
        require_means(ablation)
    for heads in sets:
        for layer, head in heads:
            model.layout.check_head(layer, head)
    if engine is None:
        from .engine import Engine, EngineConfig

        engine = Engine(model, EngineConfig(remote=remote))
    runner = engine.runner  # it decides where generation runs (and with which retry settings), with the engine's sites
    results: list[Generation] = []
    for start in range(0, len(token_lists), config.batch_size):
        rows = range(start, min(start + config.batch_size, len(token_lists)))
        results.extend(_generate_batch(model, runner, [token_lists[i] for i in rows], [sets[i] for i in rows], ablation,
                                       config, start, keep_logits))
    return results


def _settings(config: GenerationConfig, pad_token_id, keep_logits: bool, batch_start: int) -> tuple[dict, int | None]:
    """transformers' generate settings for one batch, and the seed its sampling draws from (None: greedy)."""
    settings = dict(
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        pad_token_id=pad_token_id,
        return_dict_in_generate=True,
        output_logits=keep_logits,
    )
    if not config.do_sample:
        settings.update(top_k=None, top_p=None, temperature=None)  # silence sampling defaults from generation_config
        return settings, None
    settings.update(top_k=config.top_k, top_p=config.top_p, temperature=config.temperature)
    return settings, config.seed + batch_start  # the same batch draws the same tokens on a rerun (seeded where it runs)


def _generate_batch(model, runner, token_lists, sets, ablation: Ablation, config, batch_start, keep_logits):
    tokenizer = model.tokenizer
    batch = left_padded(token_lists, tokenizer.pad_token_id)
    pairs = ablation_pairs(sets)
    n_rows = len(token_lists)
    settings, seed = _settings(config, tokenizer.pad_token_id, keep_logits, batch_start)
    means = ablation.means
    if means is not None and pairs:  # only the layers this batch ablates travel (remote), in the model's dtype
        means = {layer: means[layer].to(model.dtype) for layer in pairs}
    tokens = runner.inputs(dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask))
    with warnings.catch_warnings():
        # An open `tracer.all()` loop ends when generation stops (EOS or max_new_tokens); nnsight warns about the step
        # it waited for in vain. That is the intended way to cover every step whatever the length.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        # Remote: one request for the whole batch, every step on the server (intrace.generate_batch is its body).
        sequences, step_logits = runner.run(
            intrace.generate_batch, settings, tokens, pairs, ablation.in_trace(means), seed,
            label=f"generation request for prompts {batch_start}-{batch_start + n_rows - 1}")
    prompt_length = batch.input_ids.shape[1]
    generations = []
    eos = _eos_ids(model)
    for row in range(n_rows):
        new = sequences[row, prompt_length:].tolist()
        cut = next((i for i, token in enumerate(new) if token in eos), len(new))
        logits = None
        if keep_logits:
            logits = torch.stack([step[row] for step in step_logits])[: cut + 1 if cut < len(new) else cut].float().cpu()
        generations.append(Generation(new[:cut], tokenizer.decode(new[:cut], skip_special_tokens=True), logits))
    return generations


def _eos_ids(model: LoadedModel) -> set[int]:
    ids = model.module.generation_config.eos_token_id if model.module.generation_config is not None else None
    if ids is None:
        ids = model.tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {ids}
