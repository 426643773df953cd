"""SaharaConfig: what a Sahara search scores, over which candidates, and how; checked once where it is used.

Shared by `safety-heads sahara` (its flags are generated from these fields), `run` and the Python API."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ablation import AblationConfig
from .checked import Checked
from .engine import HIDDEN_READOUTS
from .errors import UserError
from .guard import GUARD_BATCH
from .objectives import OBJECTIVES

ANGLE_SCORES = ("svd", "paper-era")  # the angle objective's variants (--score); a Ships score is refusal.SCORES
# Below this relative gap between the R-th and (R+1)-th singular values of M_clean, its top-R subspace is barely
# determined (any rotation inside the near-tie fits), so every score is dominated by that ambiguity: warn.
GAP_WARNING = 1e-3


@dataclass
class SaharaConfig(Checked):
    """What to search and how. Shared by `safety-heads sahara` and `run_sahara`."""

    template: str = "auto"  # auto (chat if the tokenizer has a chat template, else raw) | raw | paper | chat (data.py)
    system: str | None = None  # system prompt, chat template only
    steps: int = 3  # heads in the group; the paper's ASR peaks at 3
    # What each step maximises (objectives.py): the paper's principal angle, or the mean drop of a refusal score over
    # the data set with the whole group ablated, learned from the clean model on refusal_limit prompts of
    # refusal_harmful and refusal_harmless (splits no evaluation uses), as `ships --score` learns it.
    objective: str = "angle"
    refusal_harmful: str = "harmful-train"
    refusal_harmless: str = "harmless-train"
    refusal_limit: int = 32
    rank: int = 1  # R, the number of left singular vectors compared (the authors' code: 1); angle only
    ablation: AblationConfig = field(default_factory=AblationConfig)  # kind, epsilon, mean reference
    heads: str | None = None  # a head spec restricting the candidates ("0-7:*"); None = every head
    exclude: str | None = None  # a head spec never chosen ("0:6"): e.g. a head whose ablation breaks the model
    dedupe: bool = False  # drop repeated queries (otherwise kept, each a row of M, with a warning)
    score: str = "svd"  # svd | paper-era (hidden dimension 0 only; see the module docstring)
    # M's rows: the final norm's output at the last token (the paper's code) or the last layer's output before the
    # norm (the cookbook notebook's `layers[-1].output`); they can choose different heads.
    readout: str = "final-norm"
    # The harmless guard (off by default, as in the paper): a head set may be chosen only if the ablated model still
    # finds the clean model's greedy answers to these harmless prompts likely, i.e. their mean NLL per token rises by
    # at most guard_max_rise nats. It keeps the search off heads whose ablation garbles every answer.
    guard: str | None = None  # a harmless data set ("harmless-val") or file; None = no guard
    guard_limit: int = 16  # its first N prompts
    guard_tokens: int = 24  # length of the clean answers (greedy)
    guard_max_rise: float = 0.25  # nats per token
    # Candidates the guard checks in its first call of a step (best-scoring first); each further call of the step
    # checks twice as many, up to GUARD_BATCH. The choice does not depend on it (it is always the best-scoring head
    # that passes), only the cost and which extra heads' rises are recorded: 1 suits a model where the best head
    # usually passes and each check is expensive (`run` uses 1).
    guard_batch: int = field(default=GUARD_BATCH, metadata={"recorded": False})
    # Locally, consecutive layers of a step share an engine call until it holds at least this many head sets (1: a
    # call per layer). Larger calls spread each call's clean and base passes over more sets (`run` uses 16, which
    # matters when candidates are pruned to a few per layer); every layer is still checkpointed on its own.
    sets_per_call: int = field(default=1, metadata={"recorded": False})
    # Candidate pruning: only the `candidates` heads ranked highest by a ships.json (`rank_by`, any --score) are
    # tried at each step. None = every head, the paper's search.
    candidates: int | None = None
    rank_by: str | None = None

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UserError(f"--steps must be at least 1, not {self.steps!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"--rank must be at least 1, not {self.rank!r}")
        if self.score not in ANGLE_SCORES:
            raise UserError(f"unknown score '{self.score}'; choose one of {', '.join(ANGLE_SCORES)}")
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective '{self.objective}'; choose one of {', '.join(OBJECTIVES)}")
        if self.objective != "angle" and (self.score != "svd" or self.rank != 1):
            raise UserError("--score and --rank set the angle objective; drop them with --objective " + self.objective)
        if not isinstance(self.refusal_limit, int) or self.refusal_limit < 2:
            raise UserError(f"--refusal-limit must be at least 2, not {self.refusal_limit!r}")
        if self.readout not in HIDDEN_READOUTS:
            raise UserError(f"--readout must be one of {', '.join(HIDDEN_READOUTS)}, not {self.readout!r}")
        if self.score == "paper-era" and self.rank != 1:
            raise UserError("--rank applies to the svd score only; the paper-era score compares one column")
        for name in ("guard_limit", "guard_tokens", "guard_batch", "sets_per_call"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)!r}")
        if self.candidates is not None and (not isinstance(self.candidates, int) or self.candidates < 1):
            raise UserError(f"--candidates must be at least 1, not {self.candidates!r}")
        if (self.candidates is None) != (self.rank_by is None):
            raise UserError("--candidates and --rank-by go together: keep the N heads a ships.json ranks highest")
        check_guard_max_rise(self.guard_max_rise)


def check_guard_max_rise(value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
        raise UserError(f"--guard-max-rise must be positive (nats per token), not {value!r}")
