"""What refusing looks like for one model, learned from the clean model, and the refusal-aware Ships scores.

The paper's Ships score (``kl``) asks "does ablating this head change the next token?". A head can change it a lot
without touching the refusal (it moves the distribution among refusal phrasings, or breaks the model), and a head
that carries the refusal can move the full distribution little. Two scores ask about the refusal itself, from the
same batched sweep and the same readouts (no trace per head):

- ``refusal-logprob``: the drop in log P(the answer opens like a refusal) at the prompt's last position, i.e.
  log sum_{t in R} p_clean(t) - log sum_{t in R} p_ablated(t), where R is the set of first tokens of the clean
  model's own refusals (greedy answers to harmful prompts that contain a refusal phrase).
- ``refusal-direction``: the drop of the last-token final-norm residual along the model's refusal direction,
  (h_clean - h_ablated) . r, with r the unit difference of mean last-token residuals on harmful and harmless prompts
  (Arditi et al. 2024, "Refusal in language models is mediated by a single direction").

Both are learned on harmful-train and harmless-train (refusal_direction's splits), which no evaluation here uses.
Positive = the ablation weakens the refusal; negative = strengthens it. ``kl`` is never negative.

    safety-heads ships --model demo --dataset maliciousinstruct --limit 8 --template chat --score refusal-direction --out runs/rd
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import UserError

SCORES = ("kl", "refusal-logprob", "refusal-direction")
SCORE_LABELS = {
    "kl": "KL(clean || ablated), nats",
    "refusal-logprob": "drop in log P(refusal opening), nats",
    "refusal-direction": "drop along the refusal direction",
}
OPENING_TOKENS = 8  # long enough for "I'm sorry, but I can't" to show one of the phrases


class NoRefusal(UserError):
    """The clean model shows no refusal to learn from (it refuses none of the harmful prompts)."""


@dataclass
class RefusalSignal:
    """The learned refusal signal of one model under one template, recorded in every result that uses it."""

    direction: torch.Tensor | None  # [d_model] float64, unit norm
    direction_norm: float | None  # |mean harmful - mean harmless| before normalising
    opening_tokens: list[int]  # R: first tokens of the clean model's refusals
    opening_texts: list[str]
    opening_counts: list[int]
    n_refusals: int  # of n_harmful clean answers
    n_harmful: int
    n_harmless: int

    def record(self) -> dict:
        return {
            "direction_norm": self.direction_norm, "opening_tokens": self.opening_tokens,
            "opening_texts": self.opening_texts, "opening_counts": self.opening_counts,
            "refusals": f"{self.n_refusals}/{self.n_harmful}", "n_harmless": self.n_harmless,
        }


def is_refusal(text: str) -> bool:
    """The answer contains one of refusal_direction's 12 phrases (the `refusal-direction` keyword judge's list)."""
    from .judges import KEYWORD_JUDGES

    return KEYWORD_JUDGES["refusal-direction"].refused(text)


# Signals learned in this process, per model module (held weakly: a freed model takes its signals with it): `run`
# needs the same one in up to three stages (the check that the model refuses, the refusal Ships ranking, the refusal
# search), and learning it means generating answers. Keyed by everything else that determines it.
_LEARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def learn_signal(engine, model, harmful: Sequence[Sequence[int]], harmless: Sequence[Sequence[int]], need: str) -> RefusalSignal:
    """The refusal direction (for ``refusal-direction``) or opening tokens (``refusal-logprob``) from clean runs;
    learned once per process for the same model, engine readout and place, prompts and score."""
    key = (need, engine.config.hidden_readout, str(engine.config.remote), tuple(map(tuple, harmful)),
           tuple(map(tuple, harmless)))
    learned = _LEARNED.setdefault(model.module, {})
    if key not in learned:
        learned[key] = _learn(engine, model, harmful, harmless, need)
    return learned[key]


def learn_from(engine, model, need: str, config) -> RefusalSignal:
    """learn_signal on the refusal sets a ShipsConfig or SaharaConfig names (refusal_harmful, refusal_harmless, the
    first refusal_limit of each), under its template and system prompt."""
    from .data import prompt_tokens

    harmful, harmless = (prompt_tokens(name, config.refusal_limit, config.template, model.tokenizer, config.system)
                         for name in (config.refusal_harmful, config.refusal_harmless))
    return learn_signal(engine, model, harmful, harmless, need)


def _learn(engine, model, harmful: Sequence[Sequence[int]], harmless: Sequence[Sequence[int]], need: str) -> RefusalSignal:
    from .generate import GenerationConfig, generate

    direction = norm = None
    tokens: list[int] = []
    texts: list[str] = []
    counts: list[int] = []
    n_refusals = 0
    if need == "refusal-direction":
        result = engine.run(list(harmful) + list(harmless), [[]], readouts=("hidden",))
        hidden = result.clean_hidden.double()
        difference = hidden[: len(harmful)].mean(0) - hidden[len(harmful):].mean(0)
        norm = float(difference.norm())
        if not norm > 0:
            raise NoRefusal("harmful and harmless prompts give the same mean residual: no refusal direction to learn")
        direction = difference / norm
    else:
        answers = generate(model, harmful, config=GenerationConfig(max_new_tokens=OPENING_TOKENS, batch_size=16), engine=engine)
        first = Counter(a.token_ids[0] for a in answers if a.token_ids and is_refusal(a.text))
        n_refusals = sum(first.values())
        if not first:
            raise NoRefusal(
                f"the clean model refused none of {len(harmful)} harmful prompts (no refusal phrase in its first "
                f"{OPENING_TOKENS} tokens), so there is no refusal opening to score (refusal-direction needs none)"
            )
        for token, count in first.most_common():
            tokens.append(int(token))
            texts.append(model.tokenizer.decode([token]))
            counts.append(count)
    return RefusalSignal(direction, norm, tokens, texts, counts, n_refusals, len(harmful), len(harmless))


def score_values(name: str, clean_logits, ablated_logits, clean_hidden, ablated_hidden, signal: RefusalSignal | None) -> torch.Tensor:
    """One refusal-aware score per ablated row (``kl`` is ships.kl_divergence). clean_*: [d]; ablated_*: [rows, d]."""
    if name == "refusal-logprob":
        index = torch.tensor(signal.opening_tokens)
        clean = torch.log_softmax(clean_logits.double(), dim=-1)[index].logsumexp(-1)
        ablated = torch.log_softmax(ablated_logits.double(), dim=-1)[:, index].logsumexp(-1)
        return clean - ablated
    if name == "refusal-direction":
        return (clean_hidden.double() - ablated_hidden.double()) @ signal.direction
    raise ValueError(name)


def readouts_for(name: str) -> tuple[str, ...]:
    return ("hidden",) if name == "refusal-direction" else ("logits",)
