"""Sahara runs on disk: sahara.json (the documented layout, docs/sahara.md), sahara_data.pt, a heat map per step,
and a checkpoint line per layer scored and per guard check, so `--resume` recomputes at most one engine call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..ablation import format_heads
from ..errors import UserError
from ..guard import GuardCheck
from ..models import LoadedModel
from ..objectives import LABELS
from ..sahara import LayerScores, SaharaConfig, SaharaResult, SaharaStep, sahara_job
from .figures import heatmap_png
from .files import matrix_or_nan, notebook_header, read_record, save_tensors, write_json
from .folder import run_job
from .ships import read_ships

FORMAT, FORMAT_VERSION = "safety-heads/sahara", 1


def run_sahara(model: LoadedModel, queries: Sequence[str], config: SaharaConfig, *, out: str | Path | None = None,
               resume: bool = False, ranking: torch.Tensor | None = None, **options) -> SaharaResult:
    """Greedy Sahara search; with `out`, checkpoint after every layer of every step and write sahara.json,
    sahara_data.pt and a heat map per step. Pruned candidates (config.candidates) are ranked by `ranking` when the
    caller holds it (`run` passes its Ships stage's mean), else by the ships.json named by config.rank_by. `options`
    as sahara.sahara_job: engine_config, source (where the queries came from, recorded), progress."""
    if ranking is None and config.candidates is not None and config.rank_by is not None:
        ranking = read_ranking(config.rank_by, model.layout)
    job = sahara_job(model, queries, config, ranking=ranking, **options)
    steps = job.sahara.config.steps
    return run_job(job, out, "sahara", "a finished Sahara run", resume=resume,
                   parse=lambda unit: _checked_unit(unit, steps, model.layout), encode=_unit_line, write_outputs=write_outputs)


def _unit_line(unit: LayerScores | GuardCheck) -> dict:
    if isinstance(unit, LayerScores):
        return {"step": unit.step, "layer": unit.layer, "group": unit.group, "scores": unit.scores}
    return {"step": unit.step, "group": unit.group, "guard": unit.guard}


def read_ranking(ships_json: str, layout) -> torch.Tensor:
    """The mean score matrix of a ships.json (any --score), checked against the model: [layers, heads]."""
    values = read_ships(ships_json).mean
    if tuple(values.shape) != (layout.n_layers, layout.n_heads):
        raise UserError(f"'{ships_json}' scores {values.shape[0]} x {values.shape[1]} heads, but this model has "
                        f"{layout.n_layers} x {layout.n_heads}: it was made with another model")
    return values


def read_sahara(path: str | Path) -> SaharaResult:
    """sahara.json back into the SaharaResult it was written from (sahara_record). Only the format and the group
    (`heads`) are required: a hand-written {"format": "safety-heads/sahara", "heads": [[2, 26], [3, 8]]} names a
    group for `evaluate --from`; what else is absent reads as empty."""
    return read_record(path, {FORMAT: sahara_of_record})


def sahara_of_record(record: dict) -> SaharaResult:
    steps = [SaharaStep(int(s["step"]), whole_head(s["chosen"]), float(s["score"]), matrix_or_nan(s["scores"]),
                        matrix_or_nan(s["guard_rise"]) if "guard_rise" in s else None,
                        [whole_head(h) for h in s.get("passed_over", [])]) for s in record.get("steps", [])]
    queries = record.get("queries", [])
    values = record.get("clean", {}).get("singular_values", [])
    return SaharaResult(dict(record.get("config", {})), [whole_head(h) for h in record["heads"]], steps,
                        [str(q["query"]) for q in queries], [str(q["prompt"]) for q in queries],
                        torch.tensor(values, dtype=torch.float64), dict(record.get("compute", {})))


def whole_head(pair) -> tuple[int, int]:
    """A [layer, head] pair of a result file: two integers (a hand-edited 1e400 or 1.5 is not a head)."""
    layer, head = pair
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (layer, head)):
        raise ValueError(f"head {pair!r} is not two integers")
    return layer, head


def _checked_unit(unit: dict, steps: int, layout) -> LayerScores | GuardCheck:
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
    group = [(int(l), int(h)) for l, h in group]
    if "layer" in unit:
        return LayerScores(step, unit["layer"], group, matrix_or_nan([unit["scores"]])[0])
    return GuardCheck(step, group, unit["guard"])




def write_outputs(result: SaharaResult, out: Path) -> None:
    config = result.config
    write_json(out / "sahara.json", sahara_record(result))
    save_tensors(out / "sahara_data.pt", sahara_tensors(result))
    for step in result.steps:
        before = format_heads(result.heads[: step.step - 1]) or "nothing"
        title = (f"Sahara step {step.step}: {before} + one head ({config['ablation']}, eps={config['epsilon']:g}, "
                 f"{len(result.queries)} queries): {config['model']}")
        objective = config.get("objective", "angle")  # files written before objectives existed: the angle
        label = LABELS[objective] + (" (paper-era)" if objective == "angle" and config["score"] == "paper-era" else "")
        skipped = [(l, h, float(step.guard[l, h])) for l, h in step.passed_over] if step.guard is not None else []
        heatmap_png(step.scores, out / f"sahara_step{step.step}.png", title, label, [step.chosen], skipped)


def sahara_tensors(result: SaharaResult) -> dict:
    """sahara_data.pt: the notebook-style tensors of a Sahara run."""
    return {
        **notebook_header(FORMAT, FORMAT_VERSION, result.config),
        "queries": result.queries,
        "prompts": result.prompts,
        "scores": torch.stack([s.scores for s in result.steps]),  # [steps, layers, heads], NaN = not scored
        "heads": torch.tensor([list(h) for h in result.heads], dtype=torch.long).reshape(-1, 2),
        "step_scores": torch.tensor([s.score for s in result.steps], dtype=torch.float64),
        "clean_singular_values": result.clean_singular_values,
    } | ({"guard_rise": torch.stack([s.guard for s in result.steps])} if result.steps and result.steps[0].guard is not None else {})


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


__all__ = ["run_sahara", "read_sahara", "read_ranking", "whole_head", "sahara_record", "sahara_tensors", "write_outputs",
           "FORMAT", "FORMAT_VERSION"]
