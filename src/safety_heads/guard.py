"""Sahara's harmless guard (an extension, off by default; `safety-heads run` turns it on).

Sahara's score rewards any ablation that moves the representation, including one that garbles every answer. The
guard keeps the search off such heads: the clean model first answers a few harmless prompts (greedy); a head is then
chosen only if its group raises the NLL of those answers (teacher-forced, Engine.ablated_token_log_probs) by at most
`guard_max_rise` nats/token. Candidates are checked best score first, `guard_batch` in a step's first call
(GUARD_BATCH by default, 1 in `run`) and twice as many in each further one (up to GUARD_BATCH), so the step's choice
is the best-scoring head that passes, at the cost of about one call.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from .ablation import Ablation, Head
from .errors import UserError

# The guard checks candidates best-scoring first, this many per call: enough that one call usually settles a step.
GUARD_BATCH = 8


@dataclass
class GuardCheck:
    """A unit of a Sahara search: the guard's rises (nats/token) of some candidates at one step, given the group."""

    step: int
    group: list[Head]
    guard: list[list]  # [layer, head, rise] per checked candidate


class HarmlessGuard:
    """The guard's answers and their NLL under an ablated model, for one Sahara search (its config and engine)."""

    def __init__(self, model, config, engine, ablation: Callable[[], Ablation]):
        """`ablation` gives the search's Ablation when first needed (its means are computed on first use)."""
        self.model, self.config, self.engine, self._ablation = model, config, engine, ablation

    @cached_property
    def answers(self) -> tuple[list[list[int]], torch.Tensor, int]:
        """The guard's sequences (prompt + the clean model's greedy answer, empty answers dropped), the mask of
        answer tokens among each sequence's `last` final tokens [P, last], and `last` (the longest answer)."""
        from .data import prompt_tokens
        from .generate import GenerationConfig, generate

        c = self.config
        prompts = prompt_tokens(c.guard, c.guard_limit, c.template, self.model.tokenizer, c.system)
        answers = generate(self.model, prompts, config=GenerationConfig(max_new_tokens=c.guard_tokens),
                           engine=self.engine)
        kept = [(list(prompt), answer.token_ids) for prompt, answer in zip(prompts, answers) if answer.token_ids]
        if not kept:
            raise UserError(f"the model answered none of the --guard prompts from '{c.guard}' (each ended at once); "
                            "choose another harmless set or drop --guard")
        last = max(len(answer) for _, answer in kept)
        mask = torch.zeros(len(kept), last, dtype=torch.bool)
        for row, (_, answer) in enumerate(kept):
            mask[row, last - len(answer) :] = True
        return [prompt + answer for prompt, answer in kept], mask, last

    def nll(self, head_sets: Sequence[Sequence[Head]]) -> torch.Tensor:
        """Mean NLL per token (nats) of the guard answers with each head set ablated, averaged over prompts: [K]."""
        sequences, mask, last = self.answers
        log_probs = self.engine.ablated_token_log_probs(sequences, head_sets, last, ablation=self._ablation()).double()
        per_prompt = -torch.where(mask, log_probs, 0.0).sum(-1) / mask.sum(-1)  # [K, P]
        return per_prompt.mean(-1)

    @cached_property
    def clean_nll(self) -> float:
        return float(self.nll([[]])[0])

    def rises(self, head_sets: Sequence[Sequence[Head]]) -> torch.Tensor:
        """How much each head set raises the guard answers' NLL per token over the clean model: [K] float64."""
        return self.nll(head_sets) - self.clean_nll


def choose_guarded(sahara, step: int, group: list[Head], scores: torch.Tensor, done: list[GuardCheck]
                   ) -> Generator[GuardCheck, None, tuple[Head | None, torch.Tensor, list[Head]]]:
    """The best-scoring head whose group passes the guard (None if none does), the step's guard matrix (NaN where
    not checked) and the higher-scoring heads it passed over; yields each batch of checks it makes. Candidates are
    checked best-first, `guard_batch` in the first call and twice as many in each further one (up to GUARD_BATCH),
    so a step usually costs one guard call, not one per head.

    `done` (the step's checks from the checkpoint, in order) is replayed, not recomputed: each batch the search
    forms is taken from the next checked batch, so the batch sizes continue where the killed run stopped and the
    resumed search checks exactly the heads, in exactly the batches, of an uninterrupted one."""
    n_heads = scores.shape[1]
    values = scores.flatten().tolist()
    scored = [i for i, value in enumerate(values) if value == value]  # not NaN (a NaN key would scramble the sort)
    order = [divmod(i, n_heads) for i in sorted(scored, key=lambda i: (-values[i], i))]
    chosen, passed_over = None, order
    checked: dict[Head, float] = {}
    replay = iter(done)
    size = min(sahara.config.guard_batch, GUARD_BATCH)
    for position, head in enumerate(order):
        if head not in checked:
            batch = [h for h in order[position:] if h not in checked][:size]
            size = min(2 * size, GUARD_BATCH)
            unit = next(replay, None)
            if unit is None:
                new = dict(zip(batch, sahara.guard_rises([group + [h] for h in batch]).tolist()))
                yield GuardCheck(step, group, [[layer, h, rise] for (layer, h), rise in new.items()])
            else:
                new = _replayed(unit, batch)
            checked.update(new)
        if checked[head] <= sahara.config.guard_max_rise:
            chosen, passed_over = head, order[:position]
            break
    if next(replay, None) is not None:
        raise UserError(f"cannot resume: the checkpoint holds more guard checks at step {step} than the search makes "
                        "(it was edited, or made with another --guard-batch); remove its lines from that step on")
    guard = torch.full_like(scores, float("nan"))
    for head, rise in checked.items():
        guard[head] = rise
    return chosen, guard, passed_over


def _replayed(unit: GuardCheck, batch: list[Head]) -> dict[Head, float]:
    """A checkpointed batch of checks, if it is the batch the search forms now (else the resume would differ)."""
    rises = {(int(layer), int(head)): float(rise) for layer, head, rise in unit.guard}
    if list(rises) != batch:
        raise UserError(f"cannot resume: the checkpoint's guard checks at step {unit.step} are not the ones this search "
                        f"makes (made with another --guard-batch, {len(rises)} at first?); resume with the same "
                        "--guard-batch, or remove its lines from that step on")
    return rises
