"""The whole study in one command: Ships, Sahara, evaluation of the Sahara group and of per-query Ships heads, report.

Stages, each in its own subfolder of the output, each checkpointed and resumable on its own:

1. ``ships/``: Ships on sample queries (the paper's KL);
2. ``ships-refusal/``: the refusal score of the same heads on the same queries, to rank the refusal search's
   candidates (only when the searches are pruned to a few candidates);
3. ``sahara/``: the paper's Sahara group (the angle objective; 3 steps by default);
4. ``sahara-refusal/``: the same greedy search with a refusal objective (objectives.py), the search that finds the
   heads a real model refuses with (docs/scores.md);
5. ``eval/`` and ``eval-refusal/``: baseline vs ablating each group, on held-out prompts (slices of the data sets the
   searches did not use): ASR per data set and judge, and the harmless cost;
6. ``eval-per-query/``: baseline vs ablating each query's own top-k Ships heads (the paper's "16x" setting);
7. ``report.html`` / ``report.md``, led by the recommended group (recommend.py: the largest held-out ASR rise
   within the harmless limits), and the notebook-style ``ships_data.pt``, ``sahara_data.pt``, ``eval_data.pt`` and
   ``experiment_data.pt`` (everything compiled) at the top of the folder.

`--quick` (the default on a CPU) and `--full` mirror the original notebook's QUICK_MODE switch; every setting can be
overridden. `--resume` skips finished stages and resumes the unfinished one.

    safety-heads run --out runs/demo
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from .ablation import Ablation, parse_heads
from .data import load_prompts
from .engine import Engine, EngineConfig
from .errors import UserError, about
from .evaluate import BROKEN_MODEL_NLL_RISE, EvaluateConfig, Evaluation, GivenBaseline
from .generate import GenerationConfig
from .judges import make_judges
from .models import LoadedModel
from .objectives import OBJECTIVES
from .progress import StageProgress, print_progress
from .recommend import measure, recommend
from .records import versions
from .report import RunRecords, build_report
from .runs import run_evaluation, run_sahara, run_ships
from .runs.files import load_tensors, matrix_or_nan, read_json, save_tensors, to_jsonable, write_json
from .runs.folder import (Checkpoint, check_not_foreign, check_output_folder, check_unclaimed, checkpoint_path,
                          is_finished, lock_folder, remove_stale_temporaries)
from .runs.sahara import sahara_record
from .runs.ships import ships_record
from .sahara import SaharaConfig, check_guard_max_rise
from .ships import ShipsConfig
from .slices import held_out

MODES = ("quick", "full")
# --quick on a model with more than QUICK_PRUNE_ABOVE heads: Sahara tries only the QUICK_CANDIDATES heads the Ships
# stage ranks highest (a full search costs every head x queries x steps: most of an hour for a 0.5B model on a CPU;
# benchmarks/RESULTS.md measures what pruning loses). Smaller models are searched over every head.
QUICK_CANDIDATES = 24
QUICK_PRUNE_ABOVE = 4 * QUICK_CANDIDATES
# What --quick and --full fill in for every setting left unset (None). Quick runs in minutes on a laptop CPU; full is
# the paper's scale (all queries, 128 new tokens).
STAGE_LIMITS = ("ships_limit", "sahara_limit", "eval_limit", "harmless_limit")  # what --limit sets
PRESETS = {
    "quick": dict(ships_limit=4, sahara_limit=16, eval_limit=16, harmless_limit=16, max_new_tokens=32),
    # Half of MaliciousInstruct (100) for the searches, the other half held out for the evaluation.
    "full": dict(ships_limit=50, sahara_limit=50, eval_limit=None, harmless_limit=100, max_new_tokens=128),
}


@dataclass
class ExperimentConfig:
    """Settings of `safety-heads run`; None means "from the --quick / --full preset"."""

    mode: str = "quick"
    limit: int | None = None  # every stage's limit (ships, sahara, eval, harmless) that is not set on its own
    # A default shared with a stage is the stage config's own, so it exists in one place.
    template: str = ShipsConfig.template  # auto: chat if the tokenizer has a chat template, else raw
    system: str | None = None
    ablation: str = ShipsConfig.ablation
    epsilon: float = ShipsConfig.epsilon
    ships_dataset: str = "maliciousinstruct"
    ships_limit: int | None = None
    sahara_dataset: str = "maliciousinstruct"
    sahara_limit: int | None = None
    steps: int = SaharaConfig.steps
    exclude: str | None = None  # heads Sahara never chooses (SaharaConfig.exclude)
    # Per stage (the cookbook notebook's QUICK mode samples heads and uses eps 1e-5 to find heads, 0 to evaluate):
    ships_heads: str | None = None  # the heads Ships scores (a head spec such as "*/10:*/8"); None = every head
    sahara_heads: str | None = None  # Sahara's candidates; None = every head
    ships_epsilon: float | None = None  # None = epsilon
    sahara_epsilon: float | None = None
    eval_epsilon: float | None = None
    readout: str = SaharaConfig.readout  # Sahara's representation (SaharaConfig.readout); "last-layer" as the notebook
    candidates: int | None = None  # Sahara tries only the N heads the Ships stage ranks highest; None = every head
    # Sahara's harmless guard (SaharaConfig.guard), on by default here: without it, the demo model's group includes a
    # head whose ablation garbles every answer (docs/sahara.md). None = off, the paper's search.
    guard: str | None = "harmless-val"
    guard_max_rise: float = SaharaConfig.guard_max_rise
    # The second search: the paper's greedy search with a refusal objective (objectives.py), which finds the heads a
    # real model refuses with where the angle does not (docs/scores.md, measured on Qwen). None = the paper's only.
    refusal_objective: str | None = "refusal-logprob"
    eval_datasets: str = "maliciousinstruct,jailbreakbench"
    eval_limit: int | None = None
    # Evaluate on prompts the searches did not use: an evaluation data set that a search also reads starts after
    # the last prompt any search used (e.g. maliciousinstruct:17-32 after searches on 1-16). Recorded as used.
    held_out: bool = True
    # The recommended group (recommend.py): the largest held-out ASR rise by this judge among the groups whose
    # harmless refusal rate rises by at most max_refusal_rise and answers' NLL by at most max_nll_rise nats/token
    # (evaluate.BROKEN_MODEL_NLL_RISE: on the demo's ground truth, groups that keep the model intact rise by <= 0.42,
    # groups that break it by >= 2.29).
    recommend_judge: str | None = None  # None: gcg where --judge has it (the most accurate keyword judge), else the first
    max_refusal_rise: float = 0.10
    max_nll_rise: float = BROKEN_MODEL_NLL_RISE
    harmless: str = EvaluateConfig.harmless
    harmless_limit: int | None = None
    judges: str = "paper,gcg,refusal-direction"
    max_new_tokens: int | None = None
    per_query_top_k: int = 3

    def resolved(self) -> ExperimentConfig:
        """A copy with every preset-controlled None filled in from the mode's preset."""
        if self.mode not in MODES:
            raise UserError(f"unknown mode '{self.mode}'; choose quick or full")
        values = asdict(self)
        for key in STAGE_LIMITS:
            if values[key] is None:
                values[key] = self.limit
        preset = PRESETS[self.mode]
        for key, value in preset.items():
            if values[key] is None:
                values[key] = value
        if values["recommend_judge"] is None:
            judges = [name.strip() for name in self.judges.split(",") if name.strip()]
            values["recommend_judge"] = "gcg" if "gcg" in judges else (judges or ["gcg"])[0]
        return ExperimentConfig(**values)

    def validate(self) -> None:
        Ablation(kind=self.ablation, epsilon=self.epsilon)  # checks both
        check_guard_max_rise(self.guard_max_rise)  # checked here, not when the Sahara stage starts
        for value in (self.ships_epsilon, self.sahara_epsilon, self.eval_epsilon):
            if value is not None:
                Ablation(epsilon=value)
        for field in fields(self):
            value = getattr(self, field.name)
            counted = field.name == "limit" or field.name.endswith(("_limit", "top_k", "tokens", "candidates"))
            if counted and value is not None and value < 1:
                raise UserError(f"--{field.name.replace('_', '-')} must be at least 1, not {value}")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, not {self.steps}")
        if self.refusal_objective not in (None, *OBJECTIVES[1:]):
            raise UserError(f"--refusal-objective must be one of {', '.join(OBJECTIVES[1:])}, not {self.refusal_objective!r}")
        if self.recommend_judge is not None and self.recommend_judge not in [j.strip() for j in self.judges.split(",")]:
            raise UserError(f"--recommend-judge {self.recommend_judge!r} is not among --judge {self.judges!r}")
        if not self.max_nll_rise > 0:
            raise UserError(f"--max-nll-rise must be positive (nats per token), not {self.max_nll_rise!r}")
        if not 0 <= self.max_refusal_rise <= 1:
            raise UserError(f"--max-refusal-rise is a share from 0 to 1, not {self.max_refusal_rise!r}")


def run_experiment(
    model: LoadedModel,
    config: ExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    engine_config: EngineConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run every stage into `out` (skipping finished ones when resuming) and write the report; returns experiment.json.
    Each stage hands its result to the next in memory; a stage finished earlier is read back from its folder."""
    config, pruned, queries = _prepared(model, config)
    emit = progress or print_progress
    out = _claim_folder(Path(out), model, config, resume, (engine_config or EngineConfig()).remote)
    if pruned:
        emit(f"--quick on {model.layout.n_total_heads} heads: Sahara tries the {QUICK_CANDIDATES} heads the Ships stage "
             f"ranks highest (--candidates N to change it; --full searches every head)")
    if config.held_out:
        emit(f"held out: the groups are evaluated on {config.eval_datasets} (prompts the searches did not use)")
    skipped = refusal_search_skipped(model, config, engine_config)
    if skipped:
        emit(f"no refusal search: {skipped}")
    refusal = bool(config.refusal_objective) and not skipped
    stages = Stages(model, config, queries, out, engine_config, emit, refusal)
    records = {"ships": stages.ships(), "refusal_search_skipped": skipped}
    records["sahara"] = stages.sahara(records["ships"])
    if refusal:
        ranking = stages.ships_refusal() if config.candidates else None
        records["sahara_refusal"] = stages.sahara_refusal(ranking)
    records["evaluation"] = stages.evaluate(records["sahara"])
    if refusal:
        records["evaluation_refusal"] = stages.evaluate_refusal(records["sahara_refusal"], records["evaluation"])
    records["per_query"] = stages.evaluate_per_query(records["ships"])
    return _finish(model, config, out, engine_config, stages.timings, records, emit)


def _prepared(model: LoadedModel, config: ExperimentConfig) -> tuple[ExperimentConfig, bool, dict[str, list[str]]]:
    """The config with its preset, template and pruning filled in, every setting and data set checked before the
    folder is touched; whether --quick pruned Sahara's candidates; and the Ships and Sahara stages' queries."""
    from .data import resolve_template

    config = replace(config.resolved(), template=resolve_template(config.template, model.tokenizer))  # recorded as used
    config.validate()
    pruned = config.mode == "quick" and config.candidates is None and model.layout.n_total_heads > QUICK_PRUNE_ABOVE
    if pruned:
        config = replace(config, candidates=QUICK_CANDIDATES)
    make_judges(config.judges)
    for spec in (config.exclude, config.ships_heads, config.sahara_heads):
        if spec:
            parse_heads(spec, model.layout)
    queries = {"ships": load_prompts(config.ships_dataset, limit=config.ships_limit),  # a bad name fails now,
               "sahara": load_prompts(config.sahara_dataset, limit=config.sahara_limit)}  # before anything is written
    if config.held_out:
        config = replace(config, eval_datasets=held_out_datasets(config, queries))
    if config.guard is not None:
        load_prompts(config.guard, limit=1)
    _check_answers_fit(model, config)  # reads the evaluation's data sets too
    return config, pruned, queries


def refusal_search_skipped(model: LoadedModel, config: ExperimentConfig, engine_config: EngineConfig | None = None
                           ) -> str | None:
    """Why the refusal search cannot run on this model (it refuses none of the prompts the refusal-logprob signal is
    learned from), or None. The stages reuse what is learned here (refusal.learn_signal keeps it per model). Learned
    where the stages run (`engine_config`: with --remote, on NDIF; the local copy of a remote model has no weights)."""
    if config.refusal_objective != "refusal-logprob":
        return None
    from .refusal import NoRefusal, learn_from

    try:
        learn_from(Engine(model, engine_config), model, config.refusal_objective,
                   SaharaConfig(template=config.template, system=config.system))
    except NoRefusal as error:
        return str(error).split(" (refusal-direction")[0]
    return None


def held_out_datasets(config: ExperimentConfig, queries: dict[str, list[str]]) -> str:
    """config.eval_datasets with each data set a search also reads cut to the prompts after the last one any search
    used (slices.held_out)."""
    used: dict[str, int] = {}
    for name, stage in ((config.ships_dataset, "ships"), (config.sahara_dataset, "sahara")):
        used[name] = max(used.get(name, 0), len(queries[stage]))
    return held_out(config.eval_datasets, used, config.eval_limit)


def _claim_folder(out: Path, model: LoadedModel, config: ExperimentConfig, resume: bool, remote) -> Path:
    """`out` checked, locked and holding the run's own checkpoint. Its header is the run's settings, checked on resume:
    finished stages must not be mixed with stages under other settings. Batching and retry settings change no result
    (beyond float rounding), so they may differ on resume; where the traces run (here or on NDIF) does."""
    if out.is_dir() and is_finished(out, "run"):  # the documented extension: --resume rewrites the report
        check_not_foreign(out, "run")
        if not resume:
            raise UserError(f"'{out}' holds a finished study (experiment.json); add --resume to rewrite its report "
                            "from its finished stages, or choose another --out")
    elif out.is_dir():  # new, empty or this study's unfinished run (runs.folder's rule; its stages' folders too)
        check_unclaimed(out, "run", "a finished study")
    check_output_folder(out)
    lock_folder(out)  # one writer per folder; each stage's folder is locked by its own run
    remove_stale_temporaries(out)
    header = {"model": model.name, "dtype": str(model.dtype), **asdict(config), "remote": remote}
    Checkpoint(checkpoint_path(out, "run"), header).start(resume)
    return out


class Stages:
    """The four stages, each run into its own subfolder (or read back from it when finished earlier), each returning
    its JSON record (what its file holds), so the next stage and the report take it in memory."""

    def __init__(self, model, config: ExperimentConfig, queries: dict[str, list[str]], out: Path, engine_config, emit,
                 refusal: bool):
        self.model, self.config, self.out, self.engine_config, self.emit = model, config, out, engine_config, emit
        self.queries = queries  # the Ships and Sahara stages' queries, read (and checked) before the folder was touched
        self.timings: dict[str, float] = {}
        self.common = dict(template=config.template, system=config.system, ablation=config.ablation)
        self.generation = GenerationConfig(max_new_tokens=config.max_new_tokens)
        refusal = ["ships-refusal", "sahara-refusal", "evaluate-refusal"] if refusal else []
        names = ["ships", "sahara", "evaluate", "evaluate-per-query"] + refusal
        if not config.candidates:
            names = [name for name in names if name != "ships-refusal"]
        self.total = len(names)
        self.index = 0

    def _epsilon(self, value: float | None) -> float:
        return self.config.epsilon if value is None else value  # a stage's epsilon, --epsilon where not given

    def _stage(self, name: str, final: Path, work: Callable[[Callable[[str], None]], object],
               record: Callable[[object], dict]) -> dict:
        self.index += 1
        if is_finished(final.parent, final.stem):  # its outputs written and its checkpoint removed, the last write
            self.emit(f"[{self.index}/{self.total} {name}] finished earlier: {final}")
            return read_json(final)
        started = time.monotonic()
        result = work(StageProgress(name, self.index, self.total, self.emit))
        self.timings[name] = time.monotonic() - started
        return to_jsonable(record(result))

    def ships(self) -> dict:
        c = self.config
        queries = self.queries["ships"]
        stage_config = ShipsConfig(**self.common, epsilon=self._epsilon(c.ships_epsilon), heads=c.ships_heads)
        return self._stage("ships", self.out / "ships" / "ships.json", lambda p: run_ships(
            self.model, queries, stage_config, out=self.out / "ships", resume=True, engine_config=self.engine_config,
            source={"dataset": c.ships_dataset, "limit": c.ships_limit}, progress=p), ships_record)

    def ships_refusal(self) -> torch.Tensor:
        """The refusal search's candidate ranking: the refusal score of every head on the Ships stage's queries."""
        c = self.config
        stage_config = ShipsConfig(**self.common, epsilon=self._epsilon(c.ships_epsilon), heads=c.ships_heads,
                                   score=c.refusal_objective)
        record = self._stage("ships-refusal", self.out / "ships-refusal" / "ships.json", lambda p: run_ships(
            self.model, self.queries["ships"], stage_config, out=self.out / "ships-refusal", resume=True,
            engine_config=self.engine_config, source={"dataset": c.ships_dataset, "limit": c.ships_limit}, progress=p),
            ships_record)
        return matrix_or_nan(record["aggregate"]["mean"])

    def _search(self, objective: str, ranked_by: str) -> SaharaConfig:
        c = self.config
        # guard_batch 1: the guard checks the best head first and widens only when it fails (the same choice, and on
        # a real model each check is a teacher-forced pass over every guard answer).
        return SaharaConfig(**self.common, epsilon=self._epsilon(c.sahara_epsilon), heads=c.sahara_heads,
                            readout=c.readout, steps=c.steps, exclude=c.exclude, guard=c.guard, objective=objective,
                            guard_max_rise=c.guard_max_rise, guard_batch=1, sets_per_call=16, candidates=c.candidates,
                            rank_by=str(self.out / ranked_by / "ships.json") if c.candidates else None)

    def _run_search(self, name: str, folder: str, search: SaharaConfig, ranking: torch.Tensor | None) -> dict:
        c = self.config
        return self._stage(name, self.out / folder / "sahara.json", lambda p: run_sahara(
            self.model, self.queries["sahara"], search, out=self.out / folder, resume=True,
            engine_config=self.engine_config, source={"dataset": c.sahara_dataset, "limit": c.sahara_limit},
            ranking=ranking, progress=p), sahara_record)

    def sahara(self, ships: dict) -> dict:
        """The paper's search: the angle objective (candidates ranked by the Ships stage's KL when pruned)."""
        ranking = matrix_or_nan(ships["aggregate"]["mean"]) if self.config.candidates else None
        return self._run_search("sahara", "sahara", self._search("angle", "ships"), ranking)

    def sahara_refusal(self, ranking: torch.Tensor | None) -> dict:
        """The same greedy search with the refusal objective (candidates ranked by the refusal score when pruned)."""
        search = self._search(self.config.refusal_objective, "ships-refusal")
        return self._run_search("sahara-refusal", "sahara-refusal", search, ranking)

    def _evaluation(self, **settings) -> EvaluateConfig:
        c = self.config
        return EvaluateConfig(limit=c.eval_limit, judges=c.judges, harmless_limit=c.harmless_limit, **self.common,
                              epsilon=self._epsilon(c.eval_epsilon), **settings)

    def evaluate(self, sahara: dict) -> dict:
        config = self._evaluation(datasets=self.config.eval_datasets, source=str(self.out / "sahara" / "sahara.json"),
                                  harmless=self.config.harmless)
        return self._stage("evaluate", self.out / "eval" / "eval.json", lambda p: run_evaluation(
            self.model, config, self.generation, out=self.out / "eval", resume=True, engine_config=self.engine_config,
            source_record=sahara, progress=p), Evaluation.record)

    def evaluate_refusal(self, sahara: dict, first: dict) -> dict:
        """The refusal search's group on the same prompts; the unablated answers are the first evaluation's (same
        prompts, model and decoding), so only the ablated side is generated."""
        config = self._evaluation(datasets=self.config.eval_datasets, harmless=self.config.harmless,
                                  source=str(self.out / "sahara-refusal" / "sahara.json"))
        baseline = GivenBaseline.of_record("eval/eval.json", first)
        return self._stage("evaluate-refusal", self.out / "eval-refusal" / "eval.json", lambda p: run_evaluation(
            self.model, config, self.generation, out=self.out / "eval-refusal", resume=True,
            engine_config=self.engine_config, source_record=sahara, progress=p, baseline=baseline), Evaluation.record)

    def evaluate_per_query(self, ships: dict) -> dict:
        config = self._evaluation(source=str(self.out / "ships" / "ships.json"), per_query=True,
                                  top_k=self.config.per_query_top_k, harmless=None)
        return self._stage("evaluate-per-query", self.out / "eval-per-query" / "eval.json", lambda p: run_evaluation(
            self.model, config, self.generation, out=self.out / "eval-per-query", resume=True,
            engine_config=self.engine_config, source_record=ships, progress=p), Evaluation.record)


def _finish(model, config, out: Path, engine_config, timings, records: dict, emit) -> dict:
    """The recommendation, the report, the compiled notebook-style files and experiment.json; then the run's
    checkpoint goes, the last write."""
    sahara, evaluation, per_query = records["sahara"], records["evaluation"], records["per_query"]
    recommendation = recommend_group(config, records)
    build_report(out, RunRecords(records["ships"], sahara, evaluation, per_query, _refusal_records(records),
                                 recommendation.record()), title=f"safety-heads: {model.name}", timings=timings)
    compiled = {}
    for name, path in (("ships", out / "ships" / "ships_data.pt"), ("sahara", out / "sahara" / "sahara_data.pt"),
                       ("eval", out / "eval" / "eval_data.pt"), ("eval_per_query", out / "eval-per-query" / "eval_data.pt")):
        compiled[name] = load_tensors(path)
        if name != "eval_per_query":
            save_tensors(out / f"{name}_data.pt", compiled[name])  # where the original notebook's users look
    refusal = records.get("evaluation_refusal")
    record = {
        "format": "safety-heads/experiment",
        "version": 1,
        "config": asdict(config),
        "model": model.name,
        "engine": asdict(engine_config or EngineConfig()),
        "recommended_group": recommendation.group,
        "recommendation": recommendation.record(),
        "heads": sahara["heads"],  # the paper's search (angle)
        "asr": {name: numbers for name, numbers in evaluation["results"].items()},
        "refusal_heads": records["sahara_refusal"]["heads"] if refusal else None,
        "refusal_search_skipped": records["refusal_search_skipped"],
        "asr_refusal": refusal["results"] if refusal else None,
        "asr_per_query": per_query["results"],
        "harmless": {k: v for k, v in (evaluation.get("harmless") or {}).items() if k != "samples"},
        "harmless_refusal": {k: v for k, v in (refusal.get("harmless") or {}).items() if k != "samples"} if refusal else None,
        "stages": {"ships": "ships/ships.json", "sahara": "sahara/sahara.json", "evaluate": "eval/eval.json",
                   "evaluate_per_query": "eval-per-query/eval.json", "report": "report.html"}
                  | ({"sahara_refusal": "sahara-refusal/sahara.json", "evaluate_refusal": "eval-refusal/eval.json"}
                     if refusal else {}),
        "timings_seconds": timings,
        "versions": versions(),
    }
    write_json(out / "experiment.json", record)
    save_tensors(out / "experiment_data.pt", {**compiled, "experiment": record})
    Checkpoint(checkpoint_path(out, "run"), {}).remove()
    chosen = ", ".join(recommendation.group) or f"none ({recommendation.reason})"
    emit(f"recommended group: {chosen}; the paper's search found {', '.join(f'{l}:{h}' for l, h in sahara['heads'])}")
    emit(f"report: {out / 'report.html'}")
    return record


def recommend_group(config: ExperimentConfig, records: dict):
    """recommend.py's choice between the paper's group and the refusal search's, from their held-out evaluations."""
    candidates = [measure("angle (the paper's Sahara)", records["sahara"]["heads"], records["evaluation"], config.recommend_judge)]
    if records.get("evaluation_refusal"):
        candidates.append(measure(f"{config.refusal_objective} (refusal search)", records["sahara_refusal"]["heads"],
                                  records["evaluation_refusal"], config.recommend_judge))
    return recommend(candidates, config.recommend_judge, config.max_refusal_rise, config.max_nll_rise)


def _refusal_records(records: dict) -> dict | None:
    if not records.get("evaluation_refusal"):
        return None
    return {"sahara": records["sahara_refusal"], "evaluation": records["evaluation_refusal"]}


def _check_answers_fit(model: LoadedModel, config: ExperimentConfig) -> None:
    """The evaluation stages' prompts and answers fit the context: found now, not after Ships and Sahara have run."""
    from .data import format_prompts
    from .evaluate import check_answer_room

    engine = Engine(model)
    for name in [*config.eval_datasets.split(","), config.harmless]:
        if name and name.strip():
            prompts = format_prompts(load_prompts(name.strip(), limit=config.eval_limit if name != config.harmless
                                                  else config.harmless_limit), config.template, model.tokenizer, config.system)
            with about(f"--harmless {name}" if name == config.harmless else f"--eval-datasets {name.strip()}"):
                check_answer_room(engine, prompts, config.max_new_tokens)


def default_mode() -> str:
    return "full" if torch.cuda.is_available() else "quick"
