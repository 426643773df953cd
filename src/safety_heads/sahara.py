"""Sahara: the heads a whole data set's refusals rely on, and the greedy search for a group of them (paper §4).

Representation (§4.1): M = the final-norm hidden state at each query's last prompt token, one row per query (N x d),
not mean-centred, as the authors' code does (`readout="last-layer"` takes the state before the final norm instead,
as the nnsight cookbook notebook does). Score of a head set T (Eq. 11, the code at HEAD, 6203a04): the sum of
the principal angles, in degrees, between the top-R left singular vectors of M_clean and of M_T (T ablated together):

    U1 = U_clean[:, :R],  U2 = U_T[:, :R],  sigma = svdvals(U1^T U2) clamped to [0, 1],
    score = sum(degrees(arccos(sigma)))

R = 1 by default (the authors' code; the paper gives no number), where the score is arccos(|u1 . u2|) and the SVD's
sign ambiguity cancels. The SVD always runs in float64 from the float32 readouts, whatever the model's dtype. The
left singular vectors live in query space (one weight per query), so N must exceed R: at N = R both subspaces are
all of R^N and every angle is 0.

Paper-era variant (reference/paper.md §2.2, §6.1): the code at the time of the paper (86fb3cb) called a function that
does no SVD: it normalises each *column* of the raw M and returns the angle between column 0 of M_clean and of M_T,
i.e. it measures hidden dimension 0 alone. The authors replaced it after publication; it is offered as
``score="paper-era"`` to reproduce old numbers, never by default.

Greedy search (§4.2, Algorithm 1): G = []; at each of S steps score every candidate head h not in G as G + [h]
ablated together against the *clean* model (whose M is computed once) and add the best (ties: the lowest
(layer, head)). Per step, one engine call runs all N queries for the head sets of one layer (or of a few
consecutive layers: `sets_per_call`), sharing batches, the unablated prefix of layers (the group so far ablated in
the base pass) and the template's common prefix; a checkpoint line is written for each layer, so `--resume`
recomputes at most one call and re-derives the chosen heads from the checkpointed scores.

The harmless guard (an extension, off by default; `safety-heads run` turns it on): the score rewards any ablation
that moves the representation, including one that garbles every answer. With `guard`, the clean model first answers
a few harmless prompts; a head is then chosen only if its group raises the NLL of those answers (teacher-forced,
Engine.ablated_token_log_probs) by at most `guard_max_rise` nats/token. Candidates are checked best score first,
`guard_batch` in a step's first call (GUARD_BATCH by default, 1 in `run`) and twice as many in each further one (up
to GUARD_BATCH), so the step's choice is the best-scoring head that passes, at the cost of about one call.

    safety-heads sahara --model tiny --dataset maliciousinstruct --limit 16 --steps 3 --out runs/sahara
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import torch

from .ablation import DEFAULT_EPSILON, Ablation, Head, format_heads, parse_heads
from .engine import HIDDEN_READOUTS, Engine, EngineConfig
from .errors import UserError
from .models import LoadedModel
from .figures import heatmap_png
from .progress import print_progress
from .results import compute_record, matrix_or_nan, open_run, run_record, save_tensors, versions, write_json

SCORES = ("svd", "paper-era")
FORMAT = "safety-heads/sahara"
FORMAT_VERSION = 1
# Below this relative gap between the R-th and (R+1)-th singular values of M_clean, its top-R subspace is barely
# determined (any rotation inside the near-tie fits), so every score is dominated by that ambiguity: warn.
GAP_WARNING = 1e-3
# The guard checks candidates best-scoring first, this many per call: enough that one call usually settles a step.
GUARD_BATCH = 8


@dataclass
class SaharaConfig:
    """What to search and how. Shared by `safety-heads sahara` and `run_sahara`."""

    template: str = "auto"  # auto (chat if the tokenizer has a chat template, else raw) | raw | paper | chat (data.py)
    system: str | None = None  # system prompt, chat template only
    steps: int = 3  # heads in the group; the paper's ASR peaks at 3
    rank: int = 1  # R, the number of left singular vectors compared (the authors' code: 1)
    ablation: str = "ua"
    epsilon: float = DEFAULT_EPSILON
    heads: str | None = None  # a head spec restricting the candidates ("0-7:*"); None = every head
    exclude: str | None = None  # a head spec never chosen ("0:6"): e.g. a head whose ablation breaks the model
    dedupe: bool = False  # drop repeated queries (otherwise kept, each a row of M, with a warning)
    mean_reference: str = "harmless-val"  # data set whose mean head outputs `mean` ablation substitutes
    mean_reference_limit: int = 64
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
        Ablation(kind=self.ablation, epsilon=self.epsilon)  # checks both
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UserError(f"--steps must be at least 1, not {self.steps!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"--rank must be at least 1, not {self.rank!r}")
        if self.score not in SCORES:
            raise UserError(f"unknown score '{self.score}'; choose one of {', '.join(SCORES)}")
        if self.readout not in HIDDEN_READOUTS:
            raise UserError(f"--readout must be one of {', '.join(HIDDEN_READOUTS)}, not {self.readout!r}")
        if self.score == "paper-era" and self.rank != 1:
            raise UserError("--rank applies to the svd score only; the paper-era score compares one column")
        if self.mean_reference_limit < 1:
            raise UserError(f"--mean-reference-limit must be at least 1, not {self.mean_reference_limit!r}")
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


@dataclass
class SaharaStep:
    step: int  # 1-based
    chosen: Head
    score: float  # the score of the group after this step (G + [chosen])
    scores: torch.Tensor  # [layers, heads] float64, NaN for heads in G or not candidates
    guard: torch.Tensor | None = None  # [layers, heads] rise of the guard answers' NLL (nats/token), NaN = not checked
    passed_over: list[Head] = field(default_factory=list)  # higher-scoring heads the guard rejected, best first


@dataclass
class SaharaResult:
    config: dict
    heads: list[Head]  # in the order chosen
    steps: list[SaharaStep]
    queries: list[str]
    prompts: list[str]  # the formatted texts
    clean_singular_values: torch.Tensor  # of M_clean, float64, descending
    compute: dict = field(default_factory=dict)  # this process's engine sweeps: FLOPs (flops.py) and seconds


# ----------------------------------------------------------------------------------------------------------------
# The score: pure functions of the representation matrices.


def left_basis(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` left singular vectors of [..., N, d], in float64: [..., N, rank]."""
    return torch.linalg.svd(matrix.double(), full_matrices=False).U[..., :rank]


def angles_to_basis(basis: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """Sum of principal angles (degrees) between `basis` [N, R] and each [K, N, d] matrix's top-R left subspace: [K]."""
    other = left_basis(ablated, basis.shape[-1])
    sigma = torch.linalg.svdvals(basis.T @ other).clamp(0.0, 1.0)  # cosines of the principal angles, sign-free
    return torch.rad2deg(torch.arccos(sigma)).sum(-1)


def subspace_angles(clean: torch.Tensor, ablated: torch.Tensor, rank: int = 1) -> torch.Tensor:
    """`subspace_angle` of `clean` [N, d] against each of `ablated` [K, N, d]: [K] float64."""
    _check_shapes(clean, ablated.shape[1:], rank)
    return angles_to_basis(left_basis(clean, rank), ablated)


def subspace_angle(clean: torch.Tensor, ablated: torch.Tensor, rank: int = 1) -> float:
    """Sum of the principal angles, in degrees, between the top-`rank` left singular subspaces of two N x d matrices."""
    return float(subspace_angles(clean, ablated[None], rank)[0])


def paper_era_angles(clean: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """The paper-era score (86fb3cb): angle between column 0 of the column-normalised `clean` [N, d] and of each
    `ablated` [K, N, d], in degrees, sign-free. It sees hidden dimension 0 only."""
    _check_shapes(clean, ablated.shape[1:], 1)
    return angles_to_column(_unit_column(clean), ablated)


def angles_to_column(column: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """Angle (degrees, sign-free) between a unit vector [N] and column 0 of each [K, N, d] matrix, normalised: [K]."""
    return torch.rad2deg(torch.arccos((_unit_column(ablated) @ column).abs().clamp(0.0, 1.0)))


def _unit_column(matrix: torch.Tensor) -> torch.Tensor:
    """Column 0 of [..., N, d] in float64, scaled to unit length: [..., N]."""
    first = matrix.double()[..., 0]
    return first / first.norm(dim=-1, keepdim=True)


def _check_shapes(clean: torch.Tensor, ablated_shape, rank: int) -> None:
    if clean.dim() != 2 or tuple(ablated_shape) != tuple(clean.shape):
        raise ValueError(f"need matrices of the same N x d shape, not {tuple(clean.shape)} and {tuple(ablated_shape)}")
    if not 1 <= rank <= min(clean.shape):
        raise ValueError(f"rank must be from 1 to min(N, d) = {min(clean.shape)}, not {rank}")


def best_head(scores: torch.Tensor) -> tuple[Head, float]:
    """The highest-scoring head of a [layers, heads] matrix (NaN = not scored); ties go to the lowest (layer, head)."""
    flat = torch.nan_to_num(scores.flatten(), nan=-float("inf"))
    index = int(torch.argmax(flat))  # the first maximum in row-major order, i.e. the lowest (layer, head)
    if flat[index] == -float("inf"):
        raise ValueError("no head was scored")
    n_heads = scores.shape[1]
    return (index // n_heads, index % n_heads), float(scores.flatten()[index])


# ----------------------------------------------------------------------------------------------------------------
# Scoring head sets on a model.


def ranked_candidates(ships_json: str, layout, heads: Sequence[Head]) -> list[Head]:
    """`heads` ordered by the mean score of a ships.json (any --score), best first; unscored heads last."""
    from .results import matrix_or_nan, read_json

    record = read_json(ships_json)
    try:
        values = matrix_or_nan(record["aggregate"]["mean"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"'{ships_json}' is not a ships.json (no aggregate.mean); give the file `safety-heads ships` wrote") from None
    if tuple(values.shape) != (layout.n_layers, layout.n_heads):
        raise UserError(f"'{ships_json}' scores {values.shape[0]} x {values.shape[1]} heads, but this model has "
                        f"{layout.n_layers} x {layout.n_heads}: it was made with another model")
    key = torch.nan_to_num(values, nan=-float("inf"))
    return sorted(heads, key=lambda head: -float(key[head]))


class Sahara:
    """Scores head sets over one data set for one model and configuration."""

    def __init__(self, model: LoadedModel, config: SaharaConfig, engine_config: EngineConfig | None = None):
        config.validate()
        self.model, self.config = model, config
        self.engine = Engine(model, replace(engine_config or EngineConfig(), hidden_readout=config.readout))
        self.flops = 0.0  # of every scoring sweep so far (the guard's teacher-forced passes are not counted)
        layout = model.layout
        candidates: list[Head] = list(parse_heads(config.heads, layout)) if config.heads else [
            (layer, head) for layer in range(layout.n_layers) for head in range(layout.n_heads)
        ]
        excluded = set(parse_heads(config.exclude, layout)) if config.exclude else set()
        self.candidates = [head for head in candidates if head not in excluded]
        if config.candidates is not None:
            self.candidates = ranked_candidates(config.rank_by, layout, self.candidates)[: config.candidates]

    @cached_property
    def means(self) -> torch.Tensor | None:
        """Computed on first use, so bad input is reported before the reference pass."""
        if self.config.ablation != "mean":
            return None
        from .data import prompt_tokens

        c = self.config
        return self.engine.head_means(prompt_tokens(c.mean_reference, c.mean_reference_limit, c.template, self.model.tokenizer, c.system))

    def clean(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """M_clean: [N, d] float32, the final-norm hidden state at each query's last token."""
        return self.engine.run(tokens, [], readouts=("hidden",)).clean_hidden

    def reference(self, clean: torch.Tensor) -> torch.Tensor:
        """What every ablated matrix is compared with: U_clean[:, :R], or column 0 (normalised) for paper-era."""
        return _unit_column(clean) if self.config.score == "paper-era" else left_basis(clean, self.config.rank)

    def score_sets(
        self, tokens: Sequence[Sequence[int]], reference: torch.Tensor, head_sets: Sequence[Sequence[Head]]
    ) -> torch.Tensor:
        """The score of each head set (all heads of a set ablated together) over all queries: [K] float64."""
        c = self.config
        result = self.engine.run(
            tokens, head_sets, ablation=Ablation(kind=c.ablation, epsilon=c.epsilon, means=self.means), readouts=("hidden",)
        )
        self.flops += result.stats.get("flops", 0.0)
        ablated = result.hidden.transpose(0, 1)  # [K, N, d]
        return angles_to_column(reference, ablated) if c.score == "paper-era" else angles_to_basis(reference, ablated)

    # -- the harmless guard ----------------------------------------------------------------------------------------

    @cached_property
    def guard_answers(self) -> tuple[list[list[int]], torch.Tensor, int]:
        """The guard's sequences (prompt + the clean model's greedy answer, empty answers dropped), the mask of
        answer tokens among each sequence's `last` final tokens [P, last], and `last` (the longest answer)."""
        from .data import prompt_tokens
        from .generate import GenerationConfig, generate

        c = self.config
        prompts = prompt_tokens(c.guard, c.guard_limit, c.template, self.model.tokenizer, c.system)
        answers = generate(self.model, prompts, config=GenerationConfig(max_new_tokens=c.guard_tokens),
                           engine=self.engine if self.engine.remote else None)
        kept = [(list(prompt), answer.token_ids) for prompt, answer in zip(prompts, answers) if answer.token_ids]
        if not kept:
            raise UserError(f"the model answered none of the --guard prompts from '{c.guard}' (each ended at once); "
                            "choose another harmless set or drop --guard")
        last = max(len(answer) for _, answer in kept)
        mask = torch.zeros(len(kept), last, dtype=torch.bool)
        for row, (_, answer) in enumerate(kept):
            mask[row, last - len(answer) :] = True
        return [prompt + answer for prompt, answer in kept], mask, last

    def guard_nll(self, head_sets: Sequence[Sequence[Head]]) -> torch.Tensor:
        """Mean NLL per token (nats) of the guard answers with each head set ablated, averaged over prompts: [K]."""
        sequences, mask, last = self.guard_answers
        c = self.config
        log_probs = self.engine.ablated_token_log_probs(
            sequences, head_sets, last, ablation=Ablation(kind=c.ablation, epsilon=c.epsilon, means=self.means)
        ).double()
        per_prompt = -torch.where(mask, log_probs, 0.0).sum(-1) / mask.sum(-1)  # [K, P]
        return per_prompt.mean(-1)

    @cached_property
    def guard_clean_nll(self) -> float:
        return float(self.guard_nll([[]])[0])

    def guard_rises(self, head_sets: Sequence[Sequence[Head]]) -> torch.Tensor:
        """How much each head set raises the guard answers' NLL per token over the clean model: [K] float64."""
        return self.guard_nll(head_sets) - self.guard_clean_nll


# ----------------------------------------------------------------------------------------------------------------
# The greedy search, checkpointed.


def run_sahara(
    model: LoadedModel,
    queries: Sequence[str],
    config: SaharaConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    engine_config: EngineConfig | None = None,
    source: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> SaharaResult:
    """Greedy Sahara search; with `out`, checkpoint after every layer of every step and write sahara.json,
    sahara_data.pt and a heat map per step."""
    from .data import format_prompts, resolve_template

    config = replace(config, template=resolve_template(config.template, model.tokenizer))  # recorded as used
    config.validate()
    started = time.perf_counter()
    progress = progress or print_progress
    queries, duplicates = _dedupe(list(queries), config.dedupe, progress)  # first: the fingerprint sees what is used
    sahara = Sahara(model, config, engine_config)
    _check_sizes(len(queries), sahara.engine.d_model, len(sahara.candidates), config)
    prompts = format_prompts(queries, config.template, model.tokenizer, config.system)
    tokens = sahara.engine.tokenize([p.token_ids for p in prompts])  # every prompt fits: fail before writing
    if config.guard is not None:
        sahara.guard_answers  # a bad --guard data set fails here, before anything is written
    record = run_record(model, config, queries, source or {}) | {"duplicates": duplicates}

    finished: dict[tuple[int, int], dict] = {}
    guard_units: dict[int, list[dict]] = {}  # per step, the checkpointed guard checks
    checkpoint = None
    if out is not None:
        out, checkpoint, units = open_run(out, "sahara", "a finished Sahara run", record, resume,
                                          parse=lambda unit: _checked_unit(unit, config.steps, model.layout))
        for unit in units:
            if "layer" in unit:
                finished[(unit["step"], unit["layer"])] = unit
            else:
                guard_units.setdefault(unit["step"], []).append(unit)
        if finished:
            progress(f"resuming: {len(finished)} layer scorings already checkpointed")

    clean = sahara.clean(tokens)
    singular_values = torch.linalg.svdvals(clean.double())
    if config.score == "svd" and config.rank < len(singular_values):
        low, high = singular_values[config.rank].item(), singular_values[config.rank - 1].item()
        if high - low <= GAP_WARNING * high:
            progress(f"warning: singular values {config.rank} and {config.rank + 1} of the clean representation "
                     f"nearly tie ({high:.6g} vs {low:.6g}); its top-{config.rank} subspace is ill-determined, so "
                     "the scores are unstable")
    reference = sahara.reference(clean)
    if config.guard is not None:
        sequences, _, _ = sahara.guard_answers
        progress(f"guard: the clean model's answers to {len(sequences)} prompts of {config.guard} have NLL "
                 f"{sahara.guard_clean_nll:.3f} nats/token; a chosen group may raise it by {config.guard_max_rise:g} at most")

    layout = model.layout
    group: list[Head] = []
    steps: list[SaharaStep] = []
    for step in range(1, config.steps + 1):
        scores = torch.full((layout.n_layers, layout.n_heads), float("nan"), dtype=torch.float64)
        by_layer: dict[int, list[Head]] = {}
        for head in sahara.candidates:
            if head not in group:
                by_layer.setdefault(head[0], []).append(head)
        layers = [(position, layer, heads) for position, (layer, heads) in enumerate(sorted(by_layer.items()), start=1)]
        pending = set()
        for _, layer, _ in layers:
            unit = finished.get((step, layer))
            if unit is None:
                pending.add(layer)
                continue
            _check_group(unit, group, out)
            scores[layer] = matrix_or_nan([unit["scores"]])[0]
        for calls in _engine_calls(layers, pending, sahara.engine.config.remote, config.sets_per_call):
            candidates = [head for _, _, heads in calls for head in heads]
            values = sahara.score_sets(tokens, reference, [group + [head] for head in candidates])
            for (layer, head), value in zip(candidates, values):
                if layer in pending:
                    scores[layer, head] = value
            for position, layer, _ in calls:
                if layer not in pending:
                    continue
                if checkpoint is not None:
                    checkpoint.append({"step": step, "layer": layer, "group": group, "scores": scores[layer]})
                (_, top), value = best_head(scores[layer : layer + 1])
                progress(f"[step {step}/{config.steps}, layer {position}/{len(by_layer)}] layer {layer}: "
                         f"best {layer}:{top} ({value:.4g} deg)")
        guard, passed_over = None, []
        if config.guard is None:
            chosen, value = best_head(scores)
        else:
            checked: dict[Head, float] = {}  # the guard's rise for each head checked so far
            for unit in guard_units.get(step, []):
                _check_group(unit, group, out)
                checked.update({(layer, head): rise for layer, head, rise in unit["guard"]})
            chosen, guard, passed_over = _choose_guarded(sahara, step, group, scores, checked, checkpoint)
            if chosen is None:
                least = min((float(r) for r in guard[~guard.isnan()]), default=float("nan"))
                if not group:
                    raise UserError(f"every candidate head raises the NLL of the clean answers to --guard prompts by more "
                                    f"than {config.guard_max_rise:g} nats/token (the least: {least:.3g}); raise "
                                    "--guard-max-rise or drop --guard")
                progress(f"step {step}/{config.steps}: every remaining head raises the guard's NLL by more than "
                         f"{config.guard_max_rise:g} (the least: {least:.3g}); the group stops at {format_heads(group)}")
                break
            value = float(scores[chosen])
        group.append(chosen)
        steps.append(SaharaStep(step, chosen, value, scores, guard, passed_over))
        skipped = ", ".join(f"{layer}:{head} (+{float(guard[layer, head]):.3g} nats/token)" for layer, head in passed_over)
        progress(f"step {step}/{config.steps}: chose {chosen[0]}:{chosen[1]} ({value:.4g} deg); group {format_heads(group)}"
                 + (f"; the guard passed over {skipped}" if passed_over else ""))

    result = SaharaResult(
        record | {"versions": versions(), "layout": asdict(layout)}, group, steps,
        queries, [p.text for p in prompts], singular_values,
        compute_record(sahara.flops, time.perf_counter() - started),
    )
    if out is not None:
        write_outputs(result, out)
        checkpoint.remove()
    return result


def _engine_calls(layers: list, pending: set[int], remote: bool, sets_per_call: int) -> list[list]:
    """A step's (position, layer, heads) cut into engine calls, only those with a layer still to score.

    Locally, consecutive layers share a call until it holds `sets_per_call` head sets, and the cut depends on the
    step's layers alone, not on which are finished: a resumed run computes every layer in the same call as an
    uninterrupted run, so its numbers are identical; each layer is still checkpointed on its own. Remotely, every
    pending layer in one call (one request instead of one per layer)."""
    if remote:
        return [[entry for entry in layers if entry[1] in pending]] if pending else []
    blocks, block, size = [], [], 0
    for entry in layers:
        block.append(entry)
        size += len(entry[2])
        if size >= sets_per_call:
            blocks.append(block)
            block, size = [], 0
    if block:
        blocks.append(block)
    return [block for block in blocks if any(layer in pending for _, layer, _ in block)]


def _choose_guarded(sahara: Sahara, step: int, group: list[Head], scores: torch.Tensor, checked: dict[Head, float],
                    checkpoint) -> tuple[Head | None, torch.Tensor, list[Head]]:
    """The best-scoring head whose group passes the guard (None if none does), the step's guard matrix (NaN where
    not checked) and the higher-scoring heads it passed over. Candidates are checked best-first, `guard_batch` in the
    first call and twice as many in each further one (up to GUARD_BATCH), so a step usually costs one guard call,
    not one per head; `checked` (from the checkpoint) is never recomputed."""
    n_heads = scores.shape[1]
    values = scores.flatten().tolist()
    scored = [i for i, value in enumerate(values) if value == value]  # not NaN (a NaN key would scramble the sort)
    order = [divmod(i, n_heads) for i in sorted(scored, key=lambda i: (-values[i], i))]
    chosen, passed_over = None, order
    size = min(sahara.config.guard_batch, GUARD_BATCH)
    for position, head in enumerate(order):
        if head not in checked:
            batch = [h for h in order[position:] if h not in checked][:size]
            size = min(2 * size, GUARD_BATCH)
            new = dict(zip(batch, sahara.guard_rises([group + [h] for h in batch]).tolist()))
            checked.update(new)
            if checkpoint is not None:
                checkpoint.append({"step": step, "group": group, "guard": [[layer, h, rise] for (layer, h), rise in new.items()]})
        if checked[head] <= sahara.config.guard_max_rise:
            chosen, passed_over = head, order[:position]
            break
    guard = torch.full_like(scores, float("nan"))
    for head, rise in checked.items():
        guard[head] = rise
    return chosen, guard, passed_over


def _checked_unit(unit: dict, steps: int, layout) -> dict:
    """A checkpoint line, checked before use (it may have been edited by hand): a layer's scores or guard checks."""
    step, group = unit["step"], unit["group"]
    if not isinstance(step, int) or not 1 <= step <= steps:
        raise ValueError(f"step {step!r} is not one of 1..{steps}")
    heads = [(int(l), int(h)) for l, h in group] + [(int(l), int(h)) for l, h, _ in unit.get("guard", [])]
    if "layer" in unit:
        heads.append((unit["layer"], 0))
        if len(unit["scores"]) != layout.n_heads:
            raise ValueError(f"{len(unit['scores'])} scores for a layer of {layout.n_heads} heads")
        if not all(value is None or isinstance(value, (int, float)) for value in unit["scores"]):
            raise ValueError("a score that is not a number")
    elif "guard" not in unit:
        raise ValueError("neither a layer's scores nor guard checks")
    for layer, head in heads:
        if not (isinstance(layer, int) and 0 <= layer < layout.n_layers and 0 <= head < layout.n_heads):
            raise ValueError(f"head {layer!r}:{head!r} is not in the model")
    return unit


def _check_group(unit: dict, group: list[Head], out) -> None:
    """A checkpoint line must have been computed with the group re-derived so far."""
    if [tuple(h) for h in unit["group"]] != group:
        raise UserError(f"cannot resume: the checkpoint in '{out}' is inconsistent (step {unit['step']} was scored "
                        f"with group {format_heads(map(tuple, unit['group']))}, not {format_heads(group)})")


def _dedupe(queries: list[str], dedupe: bool, progress: Callable[[str], None]) -> tuple[list[str], int]:
    """The queries to use and how many repeats the input held (warned about, or dropped with `dedupe`)."""
    from .data import find_duplicates

    if not queries:
        raise UserError("no queries given")
    duplicates = find_duplicates(queries)
    plural = "y" if duplicates == 1 else "ies"
    if duplicates and dedupe:
        progress(f"dropped {duplicates} duplicate quer{plural} (--dedupe)")
        return list(dict.fromkeys(queries)), duplicates  # the first copy of each, in order
    if duplicates:
        progress(f"warning: {duplicates} duplicate quer{plural}; kept, each as its own row of M (so it weighs more "
                 "in the SVD); add --dedupe to drop them")
    return queries, duplicates


def _check_sizes(n: int, d: int, n_candidates: int, config: SaharaConfig) -> None:
    if n <= config.rank:  # paper-era too: one query's column normalises to +-1, always at angle 0
        raise UserError(f"{n} quer{'y' if n == 1 else 'ies'} for --rank {config.rank}: Sahara compares subspaces of "
                        f"query space, so it needs more queries than the rank (with N <= R every angle is 0)")
    if config.rank > d:
        raise UserError(f"--rank {config.rank} exceeds the model's hidden size {d}")
    if config.steps > n_candidates:
        raise UserError(f"--steps {config.steps} exceeds the {n_candidates} candidate heads; "
                        "lower --steps, widen --heads or exclude fewer")


def write_outputs(result: SaharaResult, out: Path) -> None:
    config = result.config
    write_json(out / "sahara.json", sahara_record(result))
    save_tensors(
        out / "sahara_data.pt",
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": {k: v for k, v in config.items() if k != "layout"},
            "queries": result.queries,
            "prompts": result.prompts,
            "scores": torch.stack([s.scores for s in result.steps]),  # [steps, layers, heads], NaN = not scored
            "heads": torch.tensor([list(h) for h in result.heads], dtype=torch.long).reshape(-1, 2),
            "step_scores": torch.tensor([s.score for s in result.steps], dtype=torch.float64),
            "clean_singular_values": result.clean_singular_values,
        }
        | ({"guard_rise": torch.stack([s.guard for s in result.steps])} if result.steps and result.steps[0].guard is not None else {}),
    )
    for step in result.steps:
        before = format_heads(result.heads[: step.step - 1]) or "nothing"
        title = (f"Sahara step {step.step}: {before} + one head ({config['ablation']}, eps={config['epsilon']:g}, "
                 f"{len(result.queries)} queries): {config['model']}")
        label = "principal angle to clean, degrees" + (" (paper-era)" if config["score"] == "paper-era" else "")
        skipped = [(l, h, float(step.guard[l, h])) for l, h in step.passed_over] if step.guard is not None else []
        heatmap_png(step.scores, out / f"sahara_step{step.step}.png", title, label, [step.chosen], skipped)


def sahara_record(result: SaharaResult) -> dict:
    """The stable, documented JSON layout of sahara.json (docs/sahara.md)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": result.config,
        "heads": [list(h) for h in result.heads],
        "steps": [
            {"step": s.step, "chosen": list(s.chosen), "score": s.score, "scores": s.scores}
            | ({"guard_rise": s.guard, "passed_over": [list(h) for h in s.passed_over]} if s.guard is not None else {})
            for s in result.steps
        ],
        "clean": {"singular_values": result.clean_singular_values},
        "compute": result.compute,
        "queries": [
            {"index": i, "query": q, "prompt": p} for i, (q, p) in enumerate(zip(result.queries, result.prompts))
        ],
    }


__all__ = [
    "SaharaConfig", "Sahara", "SaharaResult", "SaharaStep", "run_sahara", "subspace_angle", "subspace_angles",
    "paper_era_angles", "left_basis", "angles_to_basis", "angles_to_column", "best_head", "SCORES",
]
