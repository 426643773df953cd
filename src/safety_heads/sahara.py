"""Sahara: the heads a whole data set's refusals rely on, and the greedy search for a group of them (paper §4).

What a step maximises is the search's objective (objectives.py): the paper's subspace angle between the clean and
the ablated representation (subspace.py, the default), or the mean drop of a refusal score with the group ablated.

Greedy search (§4.2, Algorithm 1): G = []; at each of S steps score every candidate head h not in G as G + [h]
ablated together against the *clean* model (whose M is computed once) and add the best (ties: the lowest
(layer, head)). Per step, one engine call runs all N queries for the head sets of one layer (or of a few
consecutive layers: `sets_per_call`), sharing batches, the unablated prefix of layers (the group so far ablated in
the base pass) and the template's common prefix; a checkpoint line is written for each layer, so `--resume`
recomputes at most one call and re-derives the chosen heads from the checkpointed scores.

The harmless guard (guard.py, off by default; `safety-heads run` turns it on) keeps the search off heads whose
ablation garbles every answer. Reading and writing runs, checkpoints and resume: runs/sahara.py.

    safety-heads sahara --model tiny --dataset maliciousinstruct --limit 16 --steps 3 --out runs/sahara
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

import torch

from .ablation import Ablation, Head, format_heads, parse_heads
from .engine import Engine, EngineConfig
from .errors import UserError, about
from .guard import GuardCheck, HarmlessGuard, choose_guarded
from .models import LoadedModel
from .objectives import LABELS, UNITS, AngleObjective, RefusalObjective
from .progress import print_progress
from .records import compute_record, run_record, source_name, versions
from .sahara_config import ANGLE_SCORES, GAP_WARNING, SaharaConfig, check_guard_max_rise  # noqa: F401  (re-exported)
from .subspace import angles_to_basis, angles_to_column, left_basis, paper_era_angles, subspace_angle, subspace_angles  # noqa: F401
from .work import finish


@dataclass
class SaharaStep:
    step: int  # 1-based
    chosen: Head
    score: float  # the score of the group after this step (G + [chosen])
    scores: torch.Tensor  # [layers, heads] float64 (the objective's), NaN for heads in G or not candidates
    guard: torch.Tensor | None = None  # [layers, heads] rise of the guard answers' NLL (nats/token), NaN = not checked
    passed_over: list[Head] = field(default_factory=list)  # higher-scoring heads the guard rejected, best first


@dataclass
class SaharaResult:
    config: dict  # the run record; with a refusal objective, what was learned (config["refusal_signal"])
    heads: list[Head]  # in the order chosen
    steps: list[SaharaStep]
    queries: list[str]
    prompts: list[str]  # the formatted texts
    clean_singular_values: torch.Tensor  # of M_clean, float64, descending
    compute: dict = field(default_factory=dict)  # this process's engine sweeps: FLOPs (flops.py) and seconds
    signal: object = None  # refusal.RefusalSignal of a refusal objective, else None


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


def ranked_candidates(ranking: torch.Tensor, heads: Sequence[Head]) -> list[Head]:
    """`heads` ordered by a [layers, heads] ranking (a Ships run's mean score, any --score), best first; unscored
    (NaN) heads last."""
    key = torch.nan_to_num(ranking, nan=-float("inf"))
    return sorted(heads, key=lambda head: -float(key[head]))


class Sahara:
    """Scores head sets over one data set for one model and configuration."""

    def __init__(self, model: LoadedModel, config: SaharaConfig, engine_config: EngineConfig | None = None,
                 ranking: torch.Tensor | None = None):
        """`ranking` ([layers, heads], e.g. ShipsResult.mean) orders the candidates when config.candidates prunes them
        (runs.run_sahara reads it from config.rank_by)."""
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
            if ranking is None:
                raise ValueError("config.candidates prunes by a ranking: pass ranking= (a ships result's mean)")
            self.candidates = ranked_candidates(ranking, self.candidates)[: config.candidates]
        self.guard = HarmlessGuard(model, config, self.engine, lambda: self.ablation) if config.guard is not None else None

    @cached_property
    def ablation(self) -> Ablation:
        """How every head set is ablated (kind, epsilon and, for `mean`, the reference means): made on first use, so
        bad input is reported before the reference pass."""
        return self.engine.ablation(self.config.ablation, self.config.template, self.config.system)

    @cached_property
    def objective(self) -> AngleObjective | RefusalObjective:
        """What a step maximises (objectives.py). A refusal objective's signal is learned on first use (it generates
        answers), so bad input and a bad --out are reported before it."""
        c = self.config
        if c.objective == "angle":
            return AngleObjective(self.engine, c.rank, paper_era=c.score == "paper-era")
        from .refusal import learn_from

        return RefusalObjective(self.engine, c.objective, learn_from(self.engine, self.model, c.objective, c))

    def clean(self, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """M_clean: [N, d] float32, the final-norm hidden state at each query's last token (recorded for every
        objective: its singular values describe the data set)."""
        return self.engine.run(tokens, [], readouts=("hidden",)).clean_hidden

    def reference(self, clean: torch.Tensor) -> torch.Tensor | None:
        """What the objective compares every ablated model with (the angle's U_clean[:, :R]; None for a refusal
        objective, whose clean readouts come with each call)."""
        return self.objective.reference(clean)

    def score_sets(self, tokens: Sequence[Sequence[int]], reference: torch.Tensor | None,
                   head_sets: Sequence[Sequence[Head]]) -> torch.Tensor:
        """The objective of each head set (all heads of a set ablated together) over all queries: [K] float64."""
        stats = {"flops": 0.0}
        values = self.objective.score(tokens, reference, head_sets, self.ablation, stats)
        self.flops += stats["flops"]
        return values

    def guard_rises(self, head_sets: Sequence[Sequence[Head]]) -> torch.Tensor:
        """How much each head set raises the guard answers' NLL per token over the clean model: [K] (guard.py)."""
        return self.guard.rises(head_sets)


# ----------------------------------------------------------------------------------------------------------------
# The greedy search, checkpointed.


# ----------------------------------------------------------------------------------------------------------------
# The greedy search (Algorithm 1), resumable layer by layer.


@dataclass
class LayerScores:
    """A unit of a Sahara search: the scores of one layer's candidates at one step, given the group so far."""

    step: int
    layer: int
    group: list[Head]
    scores: torch.Tensor  # [heads] float64, NaN for heads not scored


@dataclass
class SaharaJob:
    """A greedy Sahara search over one data set (work.Job): `record` says what determines the numbers; `run(finished)`
    yields each layer's scores (LayerScores) and each guard check (guard.GuardCheck) as computed, skipping those in
    `finished`, and returns the SaharaResult."""

    sahara: Sahara
    queries: list[str]
    prompts: list  # data.FormattedPrompt per query
    tokens: list[list[int]]
    record: dict
    progress: Callable[[str], None]
    started: float = field(default_factory=time.perf_counter)

    def run(self, finished: Sequence) -> Generator[object, None, SaharaResult]:
        """Algorithm 1: G = []; at each step score G + [h] for every candidate h not in G against the clean model and
        add the best (with the guard: the best that passes)."""
        config, progress = self.sahara.config, self.progress
        scored = {(unit.step, unit.layer): unit for unit in finished if isinstance(unit, LayerScores)}
        checks = [unit for unit in finished if isinstance(unit, GuardCheck)]
        if scored:
            progress(f"resuming: {len(scored)} layer scorings already checkpointed")
        clean = self.sahara.clean(self.tokens)
        singular_values = torch.linalg.svdvals(clean.double())
        self._warn_if_ill_determined(singular_values)
        reference = self.sahara.reference(clean)
        self._say_objective()
        self._say_guard_limit()
        group: list[Head] = []
        steps: list[SaharaStep] = []
        for step in range(1, config.steps + 1):
            scores = yield from self.score_candidates(step, group, reference, scored)
            chosen = yield from self.choose(step, group, scores, [c for c in checks if c.step == step])
            if chosen is None:
                break
            group.append(chosen.chosen)
            steps.append(chosen)
        compute = compute_record(self.sahara.flops, time.perf_counter() - self.started)
        signal = getattr(self.sahara.objective, "signal", None)
        learned = {"refusal_signal": signal.record()} if signal is not None else {}
        config_record = self.record | learned | {"versions": versions(), "layout": asdict(self.sahara.model.layout)}
        return SaharaResult(config_record, group, steps, self.queries, [p.text for p in self.prompts], singular_values,
                            compute, signal)

    def score_candidates(self, step: int, group: list[Head], reference: torch.Tensor | None,
                         scored: dict) -> Generator[LayerScores, None, torch.Tensor]:
        """Every candidate not in `group`, scored as group + [head]: [layers, heads], NaN elsewhere. Layers already
        in `scored` (the checkpoint) are taken from it; the others are computed an engine call at a time."""
        sahara, layout = self.sahara, self.sahara.model.layout
        scores = torch.full((layout.n_layers, layout.n_heads), float("nan"), dtype=torch.float64)
        by_layer: dict[int, list[Head]] = {}
        for head in sahara.candidates:
            if head not in group:
                by_layer.setdefault(head[0], []).append(head)
        layers = [(position, layer, heads) for position, (layer, heads) in enumerate(sorted(by_layer.items()), start=1)]
        pending = set()
        for _, layer, _ in layers:
            unit = scored.get((step, layer))
            if unit is None:
                pending.add(layer)
                continue
            _check_group(unit, group)
            scores[layer] = unit.scores
        for calls in engine_calls(layers, pending, sahara.engine.runner.fewest_calls, sahara.config.sets_per_call):
            candidates = [head for _, _, heads in calls for head in heads]
            values = sahara.score_sets(self.tokens, reference, [group + [head] for head in candidates])
            for (layer, head), value in zip(candidates, values):
                if layer in pending:
                    scores[layer, head] = value
            for position, layer, _ in calls:
                if layer in pending:
                    yield LayerScores(step, layer, list(group), scores[layer].clone())
                    (_, top), value = best_head(scores[layer : layer + 1])
                    self.progress(f"[step {step}/{sahara.config.steps}, layer {position}/{len(by_layer)}] layer {layer}: "
                                  f"best {layer}:{top} ({value:.4g} {UNITS[sahara.config.objective]})")
        return scores

    def choose(self, step: int, group: list[Head], scores: torch.Tensor,
               checks: list[GuardCheck]) -> Generator[GuardCheck, None, SaharaStep | None]:
        """The step's head: the best-scoring one, or with the guard the best-scoring one that passes (None: none
        does and the group stops here)."""
        config = self.sahara.config
        guard, passed_over = None, []
        if config.guard is None:
            chosen, value = best_head(scores)
        else:
            for unit in checks:
                _check_group(unit, group)
            chosen, guard, passed_over = yield from choose_guarded(self.sahara, step, group, scores, checks)
            if chosen is None:
                self._stop_unguarded(step, group, guard)
                return None
            value = float(scores[chosen])
        skipped = ", ".join(f"{layer}:{head} (+{float(guard[layer, head]):.3g} nats/token)" for layer, head in passed_over)
        self.progress(f"step {step}/{config.steps}: chose {chosen[0]}:{chosen[1]} ({value:.4g} {UNITS[config.objective]}); group "
                      f"{format_heads(group + [chosen])}" + (f"; the guard passed over {skipped}" if passed_over else ""))
        return SaharaStep(step, chosen, value, scores, guard, passed_over)

    def _stop_unguarded(self, step: int, group: list[Head], guard: torch.Tensor) -> None:
        config = self.sahara.config
        least = min((float(r) for r in guard[~guard.isnan()]), default=float("nan"))
        if not group:
            raise UserError(f"every candidate head raises the NLL of the clean answers to --guard prompts by more "
                            f"than {config.guard_max_rise:g} nats/token (the least: {least:.3g}); raise "
                            "--guard-max-rise or drop --guard")
        self.progress(f"step {step}/{config.steps}: every remaining head raises the guard's NLL by more than "
                      f"{config.guard_max_rise:g} (the least: {least:.3g}); the group stops at {format_heads(group)}")

    def _warn_if_ill_determined(self, singular_values: torch.Tensor) -> None:
        config = self.sahara.config
        if config.objective == "angle" and config.score == "svd" and config.rank < len(singular_values):
            low, high = singular_values[config.rank].item(), singular_values[config.rank - 1].item()
            if high - low <= GAP_WARNING * high:
                self.progress(f"warning: singular values {config.rank} and {config.rank + 1} of the clean representation "
                              f"nearly tie ({high:.6g} vs {low:.6g}); its top-{config.rank} subspace is ill-determined, "
                              "so the scores are unstable")

    def _say_objective(self) -> None:
        objective = self.sahara.objective
        line = f"objective: {objective.name} ({LABELS[objective.name]})"
        if isinstance(objective, RefusalObjective):
            c = self.sahara.config
            line += f", learned from {c.refusal_limit} prompts each of {c.refusal_harmful} and {c.refusal_harmless}"
        self.progress(line)

    def _say_guard_limit(self) -> None:
        config, guard = self.sahara.config, self.sahara.guard
        if guard is not None:
            sequences, _, _ = guard.answers
            self.progress(f"guard: the clean model's answers to {len(sequences)} prompts of {config.guard} have NLL "
                          f"{guard.clean_nll:.3f} nats/token; a chosen group may raise it by {config.guard_max_rise:g} at most")


def sahara_job(model: LoadedModel, queries: Sequence[str], config: SaharaConfig, *, engine_config: EngineConfig | None = None,
               ranking: torch.Tensor | None = None, source: dict | None = None,
               progress: Callable[[str], None] | None = None) -> SaharaJob:
    """Everything checked before any work (and before a run folder is touched): the config, the template (recorded as
    used), repeated queries, the sizes, every prompt fitting the context, the guard's data set. `ranking` orders the
    candidates when config.candidates prunes them."""
    from .data import format_prompts, resolve_template

    config = replace(config, template=resolve_template(config.template, model.tokenizer))
    progress = progress or print_progress
    queries, duplicates = _dedupe(list(queries), config.dedupe, progress)  # first: the record sees what is used
    sahara = Sahara(model, config, engine_config, ranking)
    _check_sizes(len(queries), sahara.engine.d_model, len(sahara.candidates), config)
    prompts = format_prompts(queries, config.template, model.tokenizer, config.system)
    with about(source_name(source)):
        tokens = sahara.engine.tokenize([p.token_ids for p in prompts])
    if sahara.guard is not None:
        _ = sahara.guard.answers  # a bad --guard data set fails here, before anything is written
    if config.objective != "angle":
        _ = sahara.objective  # a model that refuses nothing fails here, before anything is written
    record = run_record(model, config, queries, source or {}) | {"duplicates": duplicates}
    return SaharaJob(sahara, queries, prompts, tokens, record, progress)


def find_group(model: LoadedModel, queries: Sequence[str], config: SaharaConfig, **options) -> SaharaResult:
    """The Sahara group, computed and kept nowhere (`runs.run_sahara` writes and resumes); options as `sahara_job`."""
    return finish(sahara_job(model, queries, config, **options))


def engine_calls(layers: list, pending: set[int], fewest_calls: bool, sets_per_call: int) -> list[list]:
    """A step's (position, layer, heads) cut into engine calls, only those with a layer still to score.

    Locally, consecutive layers share a call until it holds `sets_per_call` head sets, and the cut depends on the
    step's layers alone, not on which are finished: a resumed run computes every layer in the same call as an
    uninterrupted run, so its numbers are identical; each layer is still checkpointed on its own. With
    `fewest_calls` (TraceRunner: remotely), every pending layer in one call (one request instead of one per layer)."""
    if fewest_calls:
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



def _check_group(unit, group: list[Head]) -> None:
    """A checkpointed unit must have been computed with the group re-derived so far."""
    if [tuple(h) for h in unit.group] != group:
        raise UserError(f"cannot resume: the checkpoint is inconsistent (step {unit.step} was scored with group "
                        f"{format_heads(map(tuple, unit.group))}, not {format_heads(group)})")



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


__all__ = [
    "SaharaConfig", "Sahara", "SaharaResult", "SaharaStep", "SaharaJob", "LayerScores", "sahara_job", "find_group",
    "subspace_angle", "subspace_angles",
    "paper_era_angles", "left_basis", "angles_to_basis", "angles_to_column", "best_head", "ANGLE_SCORES",
]
