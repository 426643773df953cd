"""Ships runs on disk: ships.json (the documented layout, docs/ships.md), ships_data.pt, the heat map, and a
checkpoint line per query, so `--resume` continues a killed run with identical numbers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..models import LoadedModel
from ..refusal import SCORE_LABELS
from ..ships import TOP_FREQUENCY_K, QueryScores, ShipsConfig, ShipsResult, ships_job, top_heads
from .figures import heatmap_png
from .files import matrix_or_nan, notebook_header, read_record, save_tensors, write_json
from .folder import run_job

FORMAT, FORMAT_VERSION = "safety-heads/ships", 1


def run_ships(model: LoadedModel, queries: Sequence[str], config: ShipsConfig, *, out: str | Path | None = None,
              resume: bool = False, **options) -> ShipsResult:
    """Score every query; with `out`, checkpoint after each query and write ships.json, ships_data.pt and a heat map.
    `options` as ships.ships_job: engine_config, source (where the queries came from, recorded), progress."""
    job = ships_job(model, queries, config, **options)
    shape = (model.layout.n_layers, model.layout.n_heads)
    return run_job(job, out, "ships", "a finished Ships run", resume=resume,
                   parse=lambda unit: _unit_to_scores(unit, len(job.prompts), shape),
                   encode=lambda scores: _scores_to_unit(scores), write_outputs=write_outputs)


def write_outputs(result: ShipsResult, out: Path) -> None:
    config = result.config
    write_json(out / "ships.json", ships_record(result))
    save_tensors(out / "ships_data.pt", ships_tensors(result))
    title = (f"Ships ({config['ablation']}, eps={config['epsilon']:g}, {config.get('score', 'kl')}), "
             f"mean over {len(result.queries)} queries: {config['model']}")
    marked = [(l, h) for l, h, _ in top_heads(result.mean, 3)]
    heatmap_png(result.mean, out / "ships_heatmap.png", title, SCORE_LABELS[config.get("score", "kl")], marked)


def ships_tensors(result: ShipsResult) -> dict:
    """ships_data.pt: the notebook-style tensors of a Ships run."""
    return {
        **notebook_header(FORMAT, FORMAT_VERSION, result.config),
        "queries": [q.query for q in result.queries],
        "prompts": [q.prompt for q in result.queries],
        "scores": torch.stack([q.scores for q in result.queries]),
        "mean": result.mean,
        "top_frequency": result.top_frequency,
        **({"refusal_direction": result.signal.direction}
           if result.signal is not None and result.signal.direction is not None else {}),
    }


def ships_record(result: ShipsResult) -> dict:
    """The stable, documented JSON layout of ships.json (docs/ships.md)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": result.config,
        "queries": [
            {
                "index": q.index,
                "query": q.query,
                "prompt": q.prompt,
                "scores": q.scores,
                "top": [[l, h, s] for l, h, s in q.top(TOP_FREQUENCY_K)],
                **({"estimate": q.estimate} if q.estimate is not None else {}),
                **({"verified": [list(h) for h in q.verified]} if q.verified else {}),
            }
            for q in result.queries
        ],
        "compute": result.compute,
        "aggregate": {
            "mean": result.mean,
            "top_frequency": result.top_frequency,
            "top_frequency_k": TOP_FREQUENCY_K,
            "top_mean": [[l, h, s] for l, h, s in top_heads(result.mean, TOP_FREQUENCY_K)],
        },
    }


def read_ships(path: str | Path) -> ShipsResult:
    """ships.json back into the ShipsResult it was written from (ships_record): every query's scores, the mean, the
    top-10 shares, the run record and the compute. The learned refusal signal stays in config["refusal_signal"]
    (its direction tensor is in ships_data.pt), so `signal` is None."""
    return read_record(path, {FORMAT: ships_of_record})


def ships_of_record(record: dict) -> ShipsResult:
    aggregate = record["aggregate"]
    mean, frequency = matrix_or_nan(aggregate["mean"]), matrix_or_nan(aggregate["top_frequency"])
    shape = tuple(mean.shape)
    if frequency.shape != mean.shape:
        raise ValueError(f"top_frequency of shape {tuple(frequency.shape)}, not {shape}")
    queries = [_unit_to_scores(query, len(record["queries"]), shape) for query in record["queries"]]
    if [q.index for q in queries] != list(range(len(queries))):
        raise ValueError("queries out of order")
    return ShipsResult(dict(record["config"]), queries, mean, frequency, None, dict(record.get("compute", {})))


def _scores_to_unit(scores: QueryScores) -> dict:
    unit = {"index": scores.index, "query": scores.query, "prompt": scores.prompt, "scores": scores.scores}
    if scores.estimate is not None:
        unit["estimate"] = scores.estimate
    if scores.verified:
        unit["verified"] = [list(h) for h in scores.verified]
    return unit


def _unit_to_scores(unit: dict, n_queries: int, shape: tuple[int, int]) -> QueryScores:
    """A checkpoint line back into scores, checked: it may have been edited by hand, or be from another version."""
    index = unit["index"]
    if not isinstance(index, int) or not 0 <= index < n_queries:
        raise ValueError(f"query index {index!r} is not one of 0..{n_queries - 1}")
    scores = matrix_or_nan(unit["scores"])
    estimate = matrix_or_nan(unit["estimate"]) if "estimate" in unit else None
    for matrix in (scores, estimate):
        if matrix is not None and tuple(matrix.shape) != shape:
            raise ValueError(f"scores of shape {tuple(matrix.shape)}, not {shape}")
    verified = [(int(l), int(h)) for l, h in unit.get("verified", [])]
    return QueryScores(index, str(unit["query"]), str(unit["prompt"]), scores, estimate, verified)


__all__ = ["run_ships", "read_ships", "ships_record", "ships_tensors", "write_outputs", "FORMAT", "FORMAT_VERSION"]
