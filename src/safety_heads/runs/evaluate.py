"""Evaluation runs on disk: eval.json (Evaluation.record(), docs/evaluate.md), eval_data.pt, and a checkpoint line
per batch of answers; the --from file (a sahara.json or ships.json) is read here."""

from __future__ import annotations

from pathlib import Path

import torch

from ..asr import DatasetResult, Rates
from ..evaluate import (CONTENT_WARNING, AnswerBatch, EvaluateConfig, Evaluation, HarmlessCost, HarmlessSide, HeadChoice,
                        evaluation_job, heads_to_ablate)
from ..generate import GenerationConfig
from ..models import LoadedModel
from ..sahara import SaharaResult
from ..ships import ShipsResult
from .files import read_record, save_tensors, write_json
from .folder import run_job
from .sahara import FORMAT as SAHARA_FORMAT
from .sahara import sahara_of_record, whole_head
from .ships import FORMAT as SHIPS_FORMAT
from .ships import ships_of_record


def run_evaluation(model: LoadedModel, config: EvaluateConfig, generation: GenerationConfig | None = None, *,
                   out: str | Path | None = None, resume: bool = False,
                   source: ShipsResult | SaharaResult | None = None, **options) -> Evaluation:
    """Generate baseline and ablated answers, judge them, measure the harmless cost; with `out`, checkpoint each batch
    of answers and write eval.json and eval_data.pt. `source` is the --from file's result when the caller holds it
    already (`run` passes its Sahara and Ships stages' results); else the file is read (read_source). `options` as
    evaluate.evaluation_job: engine_config, progress."""
    if source is None and config.source is not None:
        source = read_source(config.source)
    job = evaluation_job(model, config, generation, source=source, **options)
    parts = {f"{name}/{side}": len(prompts) for name, prompts in job.sets.items() for side in ("baseline", "ablated")}
    if job.harmless:
        parts |= {f"harmless/{side}": len(job.harmless) for side in ("baseline", "ablated")}
    return run_job(job, out, "eval", "a finished evaluation", resume=resume,
                   parse=lambda unit: _answers_unit(unit, parts, job.generation.batch_size),
                   encode=lambda batch: {"part": batch.part, "start": batch.start, "responses": batch.responses},
                   write_outputs=write_outputs)


def choose_heads(config: EvaluateConfig, layout) -> HeadChoice:
    """The heads an evaluation ablates: --heads, or those of the --from file (read here)."""
    return heads_to_ablate(config, layout, read_source(config.source) if config.heads is None else None)


def read_source(path: str | Path) -> ShipsResult | SaharaResult:
    """An `evaluate --from` file: a ships.json or a sahara.json, read by its own reader."""
    return read_record(path, {SAHARA_FORMAT: sahara_of_record, SHIPS_FORMAT: ships_of_record})


def read_evaluation(path: str | Path) -> Evaluation:
    """eval.json back into the Evaluation it was written from (Evaluation.record())."""
    return read_record(path, {"safety-heads/eval": _evaluation})


def _evaluation(record: dict) -> Evaluation:
    results = {name: DatasetResult(int(numbers["n"]), Rates(**numbers["baseline"]), Rates(**numbers["ablated"]),
                                   dict(numbers["delta_asr"]), numbers.get("positions"))
               for name, numbers in record["results"].items()}
    heads = None if record["heads"] is None else [whole_head(pair) for pair in record["heads"]]
    harmless = record.get("harmless")
    if harmless is not None:
        sides = {side: HarmlessSide(**harmless[side]) for side in ("baseline", "ablated") if side in harmless}
        harmless = HarmlessCost(harmless["dataset"], int(harmless["n"]), list(harmless["judges"]), harmless.get("note"),
                                sides.get("baseline"), sides.get("ablated"), harmless.get("mean_kl"),
                                list(harmless.get("samples", [])))
    return Evaluation(dict(record["config"]), heads, results, dict(record["samples"]), harmless)


def write_outputs(evaluation: Evaluation, out: Path) -> None:
    write_json(out / "eval.json", evaluation.record())
    save_tensors(out / "eval_data.pt", evaluation_tensors(evaluation))


def evaluation_tensors(evaluation: Evaluation) -> dict:
    """eval_data.pt: verdicts as tensors (1 harmful, 0 refused, -1 invalid), plus the JSON's numbers and texts."""
    return _tensors(evaluation.record())


def _answers_unit(unit: dict, parts: dict[str, int], batch_size: int) -> AnswerBatch:
    """A checkpointed batch of answers, checked (a line may have been edited by hand): ((part, start), answers)."""
    part, start, responses = unit["part"], unit["start"], unit["responses"]
    if part not in parts or not isinstance(start, int) or not 0 <= start < parts[part] or start % batch_size:
        raise ValueError(f"no batch {part!r} from {start!r} in this evaluation")
    if not isinstance(responses, list) or len(responses) != min(batch_size, parts[part] - start) \
            or not all(isinstance(text, str) for text in responses):
        raise ValueError(f"the answers of batch {part!r} from {start} are not {min(batch_size, parts[part] - start)} strings")
    return AnswerBatch(part, start, responses)


def _tensors(result: dict) -> dict:
    """eval_data.pt: verdicts as tensors (1 harmful, 0 refused, -1 invalid), plus the JSON's numbers and texts."""
    code = {True: 1, False: 0, None: -1}
    verdicts = {}
    for name, samples in result["samples"].items():
        verdicts[name] = {
            side: {judge: torch.tensor([code[s[side]["verdicts"][judge]] for s in samples]) for judge in samples[0][side]["verdicts"]}
            for side in ("baseline", "ablated")
        } if samples else {}
    return {"format": result["format"], "version": result["version"], "content_warning": CONTENT_WARNING,
            "config": result["config"], "heads": result["heads"], "results": result["results"], "verdicts": verdicts,
            "samples": result["samples"], "harmless": result["harmless"]}


__all__ = ["run_evaluation", "read_evaluation", "read_source", "choose_heads", "write_outputs", "evaluation_tensors"]
