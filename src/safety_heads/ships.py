"""Ships: how much each head matters to one harmful query's refusal (paper §3.2, Eq. 9).

For a query, Ships(head) = KL(p_clean || p_ablated(head)) of the next-token distribution at the prompt's last
position, computed in float64 from float32 (or better) logits, with log-softmax rather than the original code's
1e-12 smoothing. A large KL means ablating the head moves the model's first response token, which for an aligned
model is a refusal token.

Methods:
- ``exact``: every head ablated on its own, batched by the engine (the reference every other method must match).
- ``estimate``: every head from one forward and one backward pass (a sampled-Fisher quadratic estimate; see
  estimate.py). Fast, approximate.
- ``estimate+verify``: estimate every head, then recompute the top K exactly. ``scores`` then holds exact values
  for the verified heads and estimates elsewhere; ``estimate`` keeps every estimate and ``verified`` lists the heads.

Over a data set: the mean score of each head, and how often each head is in a query's top 10 (the original
``ships_res_stats``).

    safety-heads ships --model tiny --dataset maliciousinstruct --limit 4 --out runs/ships
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

import torch

from .ablation import Ablation, AblationConfig, Head, format_heads, parse_heads
from .checked import Checked
from .engine import Engine, EngineConfig
from .errors import UserError, about
from .measures import kl_divergence, top_heads  # noqa: F401 (part of the Ships API)
from .models import LoadedModel
from .progress import print_progress
from .records import compute_record, run_record, source_name, versions
from .refusal import SCORES, RefusalSignal, learn_from, readouts_for, score_values
from .work import finish

METHODS = ("exact", "estimate", "estimate+verify")
TOP_FREQUENCY_K = 10  # the original ships_res_stats counts membership in each query's top 10


@dataclass
class ShipsConfig(Checked):
    """What to score and how. Shared by `safety-heads ships` and `run_ships`."""

    template: str = "auto"  # auto (chat if the tokenizer has a chat template, else raw) | raw | paper | chat (data.py)
    system: str | None = None  # system prompt, chat template only
    ablation: AblationConfig = field(default_factory=AblationConfig)  # kind, epsilon, mean reference
    heads: str | None = None  # a head spec restricting the sweep ("0-7:*"); None = every head
    method: str = "exact"
    top_k: int = 10  # heads recomputed exactly by estimate+verify, and listed per query
    # Exact method: queries swept together (sharing batches and their template's common prefix, computed once per
    # head set); a checkpoint line follows each such group, so a kill loses at most this many queries. It changes no
    # number, so it is not part of the run's record (a resumed run may use another).
    queries_per_pass: int = field(default=8, metadata={"recorded": False})
    estimator: str = "fisher"  # the estimate: fisher (exact per-layer changes, top-token Fisher) or sampled (estimate.py)
    top_tokens: int = 8  # fisher: next tokens backpropagated one by one
    samples: int = 64  # sampled: Fisher samples for the estimate
    samples_per_pass: int | None = None  # rows per forward+backward pass of the estimate (memory); None = all
    seed: int = 0
    # What a head's ablation is scored by: the paper's "kl", or a refusal-aware score (refusal.py) learned from the
    # clean model on refusal_limit prompts of refusal_harmful and refusal_harmless (splits no evaluation uses).
    score: str = "kl"
    refusal_harmful: str = "harmful-train"
    refusal_harmless: str = "harmless-train"
    refusal_limit: int = 32

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.score not in SCORES:
            raise UserError(f"unknown score '{self.score}'; choose one of {', '.join(SCORES)}")
        if self.score != "kl" and self.method != "exact":
            raise UserError(f"--score {self.score} needs --method exact (the gradient estimate approximates the KL only)")
        if self.refusal_limit < 2:
            raise UserError(f"--refusal-limit must be at least 2, not {self.refusal_limit}")
        if self.top_k < 1:
            raise UserError(f"--top-k must be at least 1, not {self.top_k}")
        if self.queries_per_pass < 1:
            raise UserError(f"--queries-per-pass must be at least 1, not {self.queries_per_pass}")
        if self.samples < 1:
            raise UserError(f"--samples must be at least 1, not {self.samples}")
        from .estimate import EstimateConfig

        # checked whatever the method: a bad value is a typo even where exact does not read it
        EstimateConfig(estimator=self.estimator, top_tokens=self.top_tokens, samples=self.samples,
                       samples_per_pass=self.samples_per_pass)


@dataclass
class QueryScores:
    index: int
    query: str
    prompt: str
    scores: torch.Tensor  # [layers, heads] float64, NaN where not scored
    estimate: torch.Tensor | None = None
    verified: list[Head] = field(default_factory=list)

    def top(self, k: int) -> list[tuple[int, int, float]]:
        return top_heads(self.scores, k)


@dataclass
class ShipsResult:
    config: dict
    queries: list[QueryScores]
    mean: torch.Tensor  # [layers, heads]
    top_frequency: torch.Tensor  # [layers, heads], share of queries with the head in their top 10
    signal: RefusalSignal | None = None  # what a refusal-aware score learned (None for kl)
    compute: dict = field(default_factory=dict)  # this process's exact sweeps: FLOPs (flops.py) and seconds


def exact_scores(engine: Engine, token_ids: Sequence[int], heads: Sequence[Head], *, ablation: Ablation = Ablation(),
                 score: str = "kl", signal: RefusalSignal | None = None) -> torch.Tensor:
    """Ships of each head in `heads` for one prompt, each ablated on its own the way `ablation` says (its kind,
    epsilon and means; its own heads, if any, stay ablated throughout): [layers, heads], NaN for heads not in
    `heads`. `score` is the paper's ``kl`` or a refusal-aware score (refusal.py), which needs the model's `signal`."""
    return exact_score_maps(engine, token_ids, heads, ablation=ablation, scores=(score,), signals={score: signal})[score]


def exact_score_maps(engine: Engine, token_ids: Sequence[int], heads: Sequence[Head], *, ablation: Ablation = Ablation(),
                     scores: Sequence[str] = ("kl",), signals: dict | None = None) -> dict[str, torch.Tensor]:
    """Several scores of each head from one sweep (the readouts they need, together): {score: [layers, heads]}."""
    return exact_score_maps_of([token_ids], heads, engine=engine, ablation=ablation, scores=scores, signals=signals)[0]


def exact_score_maps_of(prompts: Sequence[Sequence[int]], heads: Sequence[Head], *, engine: Engine,
                        ablation: Ablation = Ablation(), scores: Sequence[str] = ("kl",), signals: dict | None = None,
                        stats: dict | None = None) -> list[dict[str, torch.Tensor]]:
    """`exact_score_maps` of several prompts from one engine sweep, one dict per prompt. Prompts swept together share
    batches, and a template's common first tokens are computed once per head set (EngineConfig.shared_prefix).
    `stats` collects the engine's counts (traces, rows, FLOPs)."""
    layout = engine.layout
    signals = signals or {}
    maps = [{name: torch.full((layout.n_layers, layout.n_heads), float("nan"), dtype=torch.float64) for name in scores}
            for _ in prompts]
    readouts = tuple(sorted({r for name in scores for r in readouts_for(name)}))
    clean: dict[int, tuple] = {}  # prompt index -> its clean (logits, hidden)
    for what, part in engine.stream([list(ids) for ids in prompts], [[head] for head in heads],
                                    ablation=ablation, readouts=readouts, stats=stats):
        for column, prompt in enumerate(part.prompt_indices):
            if what == "clean":
                clean[prompt] = (_row(part.logits, column), _row(part.hidden, column))
                continue
            clean_logits, clean_hidden = clean[prompt]
            logits, hidden = _column(part.logits, column), _column(part.hidden, column)
            for name in scores:
                if name == "kl":
                    values = kl_divergence(clean_logits, logits)
                else:
                    values = score_values(name, clean_logits, logits, clean_hidden, hidden, signals.get(name))
                for set_index, value in zip(part.set_indices, values):
                    layer, head = heads[set_index]
                    maps[prompt][name][layer, head] = value
    return maps


def _row(values: torch.Tensor | None, index: int) -> torch.Tensor | None:
    return None if values is None else values[index]


def _column(values: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """[sets, prompts, width] -> the sets' readouts for one prompt, [sets, width]."""
    return None if values is None else values[:, index]


def aggregate(scores: torch.Tensor, k: int = TOP_FREQUENCY_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean score per head over queries ([queries, layers, heads] in), and the share of queries with it in their top k."""
    mean = scores.nanmean(dim=0)
    frequency = torch.zeros(scores.shape[1:], dtype=torch.float64)
    for query_scores in scores:
        for layer, head, _ in top_heads(query_scores, k):
            frequency[layer, head] += 1
    return mean, frequency / scores.shape[0]


class Ships:
    """Scores queries one at a time for one model and configuration."""

    def __init__(self, model: LoadedModel, config: ShipsConfig, engine_config: EngineConfig | None = None):
        self.model, self.config = model, config
        self.engine = Engine(model, engine_config)
        layout = model.layout
        self.heads = list(parse_heads(config.heads, layout)) if config.heads else [
            (layer, head) for layer in range(layout.n_layers) for head in range(layout.n_heads)
        ]
        self.ablation = self.engine.ablation(config.ablation, config.template, config.system)  # how every head is ablated
        self.stats: dict = {}  # the engine's counts over every exact sweep (traces, rows, FLOPs)

    @cached_property
    def signal(self) -> RefusalSignal | None:
        """Learned on first use (it generates answers), so bad input and a bad --out are reported before it."""
        c = self.config
        if c.score == "kl":
            return None
        return learn_from(self.engine, self.model, c.score, c)

    def score_many(self, items: Sequence[tuple[int, object]]) -> list[QueryScores]:
        """Ships of every selected head for several (index, formatted prompt) pairs: exact ones in one sweep."""
        config = self.config
        if config.method != "exact" or len(items) == 1:
            return [self.score(index, prompt) for index, prompt in items]
        return self._exact(items)

    def _exact(self, items: Sequence[tuple[int, object]]) -> list[QueryScores]:
        config = self.config
        maps = exact_score_maps_of([list(prompt.token_ids) for _, prompt in items], self.heads, engine=self.engine,
                                   ablation=self.ablation, scores=(config.score,),
                                   signals={config.score: self.signal}, stats=self.stats)
        return [QueryScores(index, prompt.query, prompt.text, scores[config.score])
                for (index, prompt), scores in zip(items, maps)]

    def score(self, index: int, prompt) -> QueryScores:
        """Ships of every selected head for one formatted prompt (data.FormattedPrompt)."""
        config, tokens = self.config, list(prompt.token_ids)
        if config.method == "exact":
            return self._exact([(index, prompt)])[0]
        from .estimate import EstimateConfig, estimate_scores

        estimate = estimate_scores(
            self.engine, tokens, ablation=self.ablation,
            config=EstimateConfig(estimator=config.estimator, top_tokens=config.top_tokens, samples=config.samples,
                                  seed=config.seed, samples_per_pass=config.samples_per_pass),
        )
        selected = torch.full_like(estimate, float("nan"))
        for layer, head in self.heads:
            selected[layer, head] = estimate[layer, head]
        if config.method == "estimate":
            return QueryScores(index, prompt.query, prompt.text, selected, estimate=selected)
        verified = [(layer, head) for layer, head, _ in top_heads(selected, config.top_k)]
        exact = exact_scores(self.engine, tokens, verified, ablation=self.ablation)
        scores = torch.where(torch.isnan(exact), selected, exact)
        return QueryScores(index, prompt.query, prompt.text, scores, estimate=selected, verified=verified)


@dataclass
class ShipsJob:
    """Ships over a list of queries, resumable query by query (work.Job): `record` says what determines the numbers,
    `run(finished)` yields each query's scores as it is computed and returns the ShipsResult."""

    ships: Ships
    queries: list
    prompts: list  # data.FormattedPrompt per query
    record: dict
    progress: Callable[[str], None]
    started: float = field(default_factory=time.perf_counter)

    def run(self, finished: Sequence[QueryScores]) -> Generator[QueryScores, None, ShipsResult]:
        ships, prompts, progress = self.ships, self.prompts, self.progress
        done = {scores.index: scores for scores in finished}
        if done:
            progress(f"resuming: {len(done)} of {len(prompts)} queries already scored")
        # Queries are swept in fixed blocks of consecutive indices. A block a kill left unfinished is swept again
        # whole, so every query is computed in the same batches as in an uninterrupted run: identical numbers.
        per_pass = ships.config.queries_per_pass if ships.config.method == "exact" else 1
        for start in range(0, len(prompts), per_pass):
            block = list(enumerate(prompts))[start : start + per_pass]
            if all(index in done for index, _ in block):
                continue
            for scores in ships.score_many(block):
                if scores.index in done:
                    continue
                done[scores.index] = scores
                yield scores
                best = ", ".join(f"{l}:{h} ({s:.3g})" for l, h, s in scores.top(3))
                progress(f"[{len(done)}/{len(prompts)}] top heads {best}  |  {_shorten(scores.query)}")
        ordered = [done[i] for i in range(len(prompts))]
        mean, frequency = aggregate(torch.stack([q.scores for q in ordered]))
        model = ships.model
        learned = {"refusal_signal": ships.signal.record()} if ships.signal is not None else {}
        config = self.record | learned | {"versions": versions(), "layout": asdict(model.layout)}
        compute = compute_record(ships.stats.get("flops", 0.0), time.perf_counter() - self.started)
        return ShipsResult(config, ordered, mean, frequency, ships.signal, compute)


def ships_job(model: LoadedModel, queries: Sequence[str], config: ShipsConfig, *, engine_config: EngineConfig | None = None,
              source: dict | None = None, progress: Callable[[str], None] | None = None) -> ShipsJob:
    """Everything checked before any work (and before a run folder is touched): the config, the template (recorded
    as used), every prompt fitting the context."""
    from .data import format_prompts, resolve_template

    config = replace(config, template=resolve_template(config.template, model.tokenizer))
    ships = Ships(model, config, engine_config)
    prompts = format_prompts(list(queries), config.template, model.tokenizer, config.system)
    with about(source_name(source)):
        ships.engine.tokenize([p.token_ids for p in prompts])
    return ShipsJob(ships, list(queries), prompts, run_record(model, config, queries, source or {}), progress or print_progress)


def find_ships(model: LoadedModel, queries: Sequence[str], config: ShipsConfig, **options) -> ShipsResult:
    """Ships of every query, computed and kept nowhere (`runs.run_ships` writes and resumes); options as `ships_job`."""
    return finish(ships_job(model, queries, config, **options))


def _shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


__all__ = ["ShipsConfig", "Ships", "ShipsResult", "QueryScores", "ShipsJob", "ships_job", "find_ships", "exact_scores",
           "kl_divergence", "aggregate", "format_heads"]
