"""The whole study in one command: Ships, Sahara, evaluation of the Sahara group and of per-query Ships heads, report.

Stages, each in its own subfolder of the output, each checkpointed and resumable on its own:

1. ``ships/``: Ships on sample queries;
2. ``sahara/``: the Sahara group (3 steps by default);
3. ``eval/``: baseline vs ablating the Sahara group: ASR per data set and judge, and the harmless cost;
4. ``eval-per-query/``: baseline vs ablating each query's own top-k Ships heads (the paper's "16x" setting);
5. ``report.html`` / ``report.md``, and the notebook-style ``ships_data.pt``, ``sahara_data.pt``, ``eval_data.pt``
   and ``experiment_data.pt`` (everything compiled) at the top of the folder.

`--quick` (the default on a CPU) and `--full` mirror the original notebook's QUICK_MODE switch; every setting can be
overridden. `--resume` skips finished stages and resumes the unfinished one.

    safety-heads run --out runs/demo
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch

from .ablation import DEFAULT_EPSILON, Ablation, parse_heads
from .engine import Engine, EngineConfig
from .errors import UserError
from .evaluate import EvaluateConfig, run_evaluation
from .generate import GenerationConfig
from .judges import make_judges
from .models import LoadedModel
from .progress import print_progress
from .report import build_report
from .results import (LOCK_NAME, Checkpoint, check_not_foreign, check_output_folder, checkpoint_path, is_finished, load_tensors,
                      lock_folder, read_json, remove_stale_temporaries, save_tensors, versions, write_json)
from .sahara import SaharaConfig, check_guard_max_rise, run_sahara
from .ships import ShipsConfig, run_ships

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
    "full": dict(ships_limit=None, sahara_limit=None, eval_limit=None, harmless_limit=100, max_new_tokens=128),
}


@dataclass
class ExperimentConfig:
    """Settings of `safety-heads run`; None means "from the --quick / --full preset"."""

    mode: str = "quick"
    limit: int | None = None  # every stage's limit (ships, sahara, eval, harmless) that is not set on its own
    template: str = "auto"  # chat if the tokenizer has a chat template, else raw (data.resolve_template)
    system: str | None = None
    ablation: str = "ua"
    epsilon: float = DEFAULT_EPSILON
    ships_dataset: str = "maliciousinstruct"
    ships_limit: int | None = None
    sahara_dataset: str = "maliciousinstruct"
    sahara_limit: int | None = None
    steps: int = 3
    exclude: str | None = None  # heads Sahara never chooses (SaharaConfig.exclude)
    # Per stage (the cookbook notebook's QUICK mode samples heads and uses eps 1e-5 to find heads, 0 to evaluate):
    ships_heads: str | None = None  # the heads Ships scores (a head spec such as "*/10:*/8"); None = every head
    sahara_heads: str | None = None  # Sahara's candidates; None = every head
    ships_epsilon: float | None = None  # None = epsilon
    sahara_epsilon: float | None = None
    eval_epsilon: float | None = None
    readout: str = "final-norm"  # Sahara's representation (SaharaConfig.readout); "last-layer" as the notebook
    candidates: int | None = None  # Sahara tries only the N heads the Ships stage ranks highest; None = every head
    # Sahara's harmless guard (SaharaConfig.guard), on by default here: without it, the demo model's group includes a
    # head whose ablation garbles every answer (docs/sahara.md). None = off, the paper's search.
    guard: str | None = "harmless-val"
    guard_max_rise: float = 0.25  # SaharaConfig.guard_max_rise
    eval_datasets: str = "maliciousinstruct,jailbreakbench"
    eval_limit: int | None = None
    harmless: str = "harmless-test"
    harmless_limit: int | None = None
    judges: str = "paper,gcg,refusal-direction"
    max_new_tokens: int | None = None
    per_query_top_k: int = 3

    def resolved(self) -> "ExperimentConfig":
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
        return ExperimentConfig(**values)

    def validate(self) -> None:
        Ablation(kind=self.ablation, epsilon=self.epsilon)  # checks both
        check_guard_max_rise(self.guard_max_rise)  # checked here, not when the Sahara stage starts
        for value in (self.ships_epsilon, self.sahara_epsilon, self.eval_epsilon):
            if value is not None:
                Ablation(epsilon=value)
        for field in fields(self):
            value = getattr(self, field.name)
            if (field.name == "limit" or field.name.endswith(("_limit", "top_k", "tokens", "candidates"))) and value is not None and value < 1:
                raise UserError(f"--{field.name.replace('_', '-')} must be at least 1, not {value}")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, not {self.steps}")


class StageProgress:
    """Prefixes a stage's progress lines with its name and elapsed time, and estimates the time left in the stage
    from the first 'k/N' count in the line (queries, answers, layers)."""

    def __init__(self, name: str, index: int, total: int, emit: Callable[[str], None]):
        self.name, self.label, self.emit, self.start = name, f"[{index}/{total} {name}]", emit, time.monotonic()

    def __call__(self, line: str) -> None:
        elapsed = time.monotonic() - self.start
        match = re.search(r"(\d+)/(\d+)", line)
        estimate = ""
        if match and int(match.group(1)) > 0 and int(match.group(2)) >= int(match.group(1)):
            done, total = int(match.group(1)), int(match.group(2))
            estimate = f", ~{elapsed * (total - done) / done:.0f}s left in this count"
        self.emit(f"{self.label} {elapsed:.0f}s{estimate} | {line}")


def run_experiment(
    model: LoadedModel,
    config: ExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    engine_config: EngineConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run every stage into `out` (skipping finished ones when resuming) and write the report; returns experiment.json."""
    from .data import load_prompts, resolve_template

    config = replace(config.resolved(), template=resolve_template(config.template, model.tokenizer))  # recorded as used
    config.validate()
    emit = progress or print_progress
    pruned = config.mode == "quick" and config.candidates is None and model.layout.n_total_heads > QUICK_PRUNE_ABOVE
    if pruned:
        config = replace(config, candidates=QUICK_CANDIDATES)
    make_judges(config.judges)  # every setting is checked before the folder is touched
    for spec in (config.exclude, config.ships_heads, config.sahara_heads):
        if spec:
            parse_heads(spec, model.layout)
    out = Path(out)
    if out.is_dir():
        check_not_foreign(out, "run")
    if out.is_dir() and any(path.name != LOCK_NAME for path in out.iterdir()) and not resume:
        raise UserError(f"'{out}' already holds files (another run?); add --resume to continue it, or choose another --out")
    check_output_folder(out)
    # Read every data set first: a bad name fails before anything is written.
    ships_queries = load_prompts(config.ships_dataset, limit=config.ships_limit)
    sahara_queries = load_prompts(config.sahara_dataset, limit=config.sahara_limit)
    if config.guard is not None:
        load_prompts(config.guard, limit=1)
    _check_answers_fit(model, config)  # reads the evaluation's data sets too
    # The run's own settings, checked on resume: finished stages must not be mixed with stages under other settings.
    # Batching and retry settings change no result (beyond float rounding), so they may differ on resume; where the
    # traces run (here or on NDIF, in another dtype) does.
    remote = (engine_config or EngineConfig()).remote
    lock_folder(out)  # one writer per folder; each stage's folder is locked by its own command
    remove_stale_temporaries(out)
    run_checkpoint = Checkpoint(checkpoint_path(out, "run"), {"model": model.name, "dtype": str(model.dtype), **asdict(config), "remote": remote})
    run_checkpoint.start(resume)
    if pruned:
        emit(f"--quick on {model.layout.n_total_heads} heads: Sahara tries the {QUICK_CANDIDATES} heads the Ships stage "
             f"ranks highest (--candidates N to change it; --full searches every head)")
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens)
    timings: dict[str, float] = {}
    common = dict(template=config.template, system=config.system, ablation=config.ablation)
    epsilon = {name: config.epsilon if value is None else value  # per stage, --epsilon where not given
               for name, value in (("ships", config.ships_epsilon), ("sahara", config.sahara_epsilon), ("eval", config.eval_epsilon))}
    stages = 4

    def stage(index: int, name: str, final: Path, work: Callable[[Callable[[str], None]], None]) -> None:
        if is_finished(final.parent, final.stem):  # its outputs written and its checkpoint removed, the last write
            emit(f"[{index}/{stages} {name}] finished earlier: {final}")
            return
        started = time.monotonic()
        work(StageProgress(name, index, stages, emit))
        timings[name] = time.monotonic() - started

    stage(1, "ships", out / "ships" / "ships.json", lambda p: run_ships(
        model, ships_queries, ShipsConfig(**common, epsilon=epsilon["ships"], heads=config.ships_heads), out=out / "ships", resume=True, engine_config=engine_config,
        source={"dataset": config.ships_dataset, "limit": config.ships_limit}, progress=p))
    # guard_batch 1: the guard checks the best head first and widens only when it fails (the same choice, and on a
    # real model each check is a teacher-forced pass over every guard answer).
    search = SaharaConfig(**common, epsilon=epsilon["sahara"], heads=config.sahara_heads, readout=config.readout, steps=config.steps,
                          exclude=config.exclude, guard=config.guard,
                          guard_max_rise=config.guard_max_rise, guard_batch=1, sets_per_call=16, candidates=config.candidates,
                          rank_by=str(out / "ships" / "ships.json") if config.candidates else None)
    stage(2, "sahara", out / "sahara" / "sahara.json", lambda p: run_sahara(
        model, sahara_queries, search, out=out / "sahara", resume=True, engine_config=engine_config,
        source={"dataset": config.sahara_dataset, "limit": config.sahara_limit}, progress=p))
    evaluation = dict(limit=config.eval_limit, judges=config.judges, harmless_limit=config.harmless_limit, **common,
                      epsilon=epsilon["eval"])
    stage(3, "evaluate", out / "eval" / "eval.json", lambda p: run_evaluation(
        model, EvaluateConfig(datasets=config.eval_datasets, source=str(out / "sahara" / "sahara.json"), harmless=config.harmless, **evaluation),
        generation, out=out / "eval", resume=True, engine_config=engine_config, progress=p))
    stage(4, "evaluate-per-query", out / "eval-per-query" / "eval.json", lambda p: run_evaluation(
        model, EvaluateConfig(source=str(out / "ships" / "ships.json"), per_query=True, top_k=config.per_query_top_k,
                              harmless=None, **evaluation),
        generation, out=out / "eval-per-query", resume=True, engine_config=engine_config, progress=p))

    ships, sahara = read_json(out / "ships" / "ships.json"), read_json(out / "sahara" / "sahara.json")
    evaluation_record, per_query = read_json(out / "eval" / "eval.json"), read_json(out / "eval-per-query" / "eval.json")
    facts = build_report(out, ships, sahara, evaluation_record, per_query, title=f"safety-heads: {model.name}", timings=timings)
    compiled = {}
    for name, path in (("ships", out / "ships" / "ships_data.pt"), ("sahara", out / "sahara" / "sahara_data.pt"),
                       ("eval", out / "eval" / "eval_data.pt"), ("eval_per_query", out / "eval-per-query" / "eval_data.pt")):
        compiled[name] = load_tensors(path)
        if name != "eval_per_query":
            save_tensors(out / f"{name}_data.pt", compiled[name])  # where the original notebook's users look
    record = {
        "format": "safety-heads/experiment",
        "version": 1,
        "config": asdict(config),
        "model": model.name,
        "engine": asdict(engine_config or EngineConfig()),
        "heads": sahara["heads"],
        "asr": {name: numbers for name, numbers in evaluation_record["results"].items()},
        "asr_per_query": per_query["results"],
        "harmless": {k: v for k, v in (evaluation_record.get("harmless") or {}).items() if k != "samples"},
        "stages": {"ships": "ships/ships.json", "sahara": "sahara/sahara.json", "evaluate": "eval/eval.json",
                   "evaluate_per_query": "eval-per-query/eval.json", "report": "report.html"},
        "timings_seconds": timings,
        "versions": versions(),
    }
    write_json(out / "experiment.json", record)
    save_tensors(out / "experiment_data.pt", {**compiled, "experiment": record})
    run_checkpoint.remove()
    emit(f"report: {out / 'report.html'} (group {', '.join(f'{l}:{h}' for l, h in facts['heads'])})")
    return record


def _check_answers_fit(model: LoadedModel, config: ExperimentConfig) -> None:
    """The evaluation stages' prompts and answers fit the context: found now, not after Ships and Sahara have run."""
    from .data import format_prompts, load_prompts
    from .evaluate import check_answer_room

    engine = Engine(model)
    for name in [*config.eval_datasets.split(","), config.harmless]:
        if name and name.strip():
            prompts = format_prompts(load_prompts(name.strip(), limit=config.eval_limit if name != config.harmless
                                                  else config.harmless_limit), config.template, model.tokenizer, config.system)
            check_answer_room(engine, prompts, config.max_new_tokens)


def default_mode() -> str:
    return "full" if torch.cuda.is_available() else "quick"
