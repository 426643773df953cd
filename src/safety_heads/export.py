"""Export a finished run in another project's layout: `--layout seed`, the nnsight cookbook notebook's four .pt files.

People arriving from that notebook have analysis code that reads `ships_data.pt`, `sahara_data.pt`, `eval_data.pt`
and `experiment_data.pt` with its keys; our own files of those names hold our (richer) layout. This writes theirs,
from our JSON results, loadable with `torch.load(..., weights_only=True)`:

- ships_data.pt: `scores` {"layer,head": float} (the mean over the run's queries), `sorted_heads` [(layer, head)],
  `sorted_scores` [float] (best first), `query` (the query; with several, "mean over N queries: first | second ..."),
  `num_layers`, `num_heads`.
- sahara_data.pt: `shifts` {"layer,head": degrees} (each head alone: step 1), `sorted_shifts` [(layer, head)],
  `sorted_scores` [float], `safety_heads` [(layer, head)] (the group, in the order chosen), `num_layers`, `num_heads`.
- eval_data.pt: `baseline_harm_rate`, `ablated_harm_rate`, `top_safety_head` (layer, head), `baseline_results` /
  `ablated_results` [(query, response, harmful)], `num_queries`, `max_tokens`. `harmful` is the notebook's keyword
  rule (judges.py `seed`) applied to each stored answer, on the first harmful data set of the evaluation.
- experiment_data.pt (a `safety-heads run` folder only): `ships_data` and `sahara_data` as above, each with a
  `matrix` [layers, heads] (zeros where not scored), `eval_data`, and `config` {"quick_mode": bool}.

    safety-heads export runs/quickstart --layout seed --out runs/quickstart-seed
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .evaluate import Evaluation
from .judges import KEYWORD_JUDGES
from .runs.evaluate import read_evaluation
from .runs.experiment import read_experiment
from .runs.files import atomic_write
from .runs.folder import check_output_folder
from .runs.sahara import read_sahara
from .runs.ships import read_ships
from .sahara import SaharaResult
from .ships import ShipsResult

LAYOUTS = ("seed",)


def export_run(run_dir: str | Path, layout: str, out: str | Path) -> list[Path]:
    """Write the files of `layout` that `run_dir` has results for; returns their paths."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown --layout '{layout}'; choose {', '.join(LAYOUTS)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"'{run_dir}' is not a folder; give the --out folder of a finished safety-heads run")
    _check_out_apart(run_dir, Path(out))
    sources = {name: _find(run_dir, name) for name in ("ships", "sahara", "eval")}
    if not any(sources.values()):
        raise UserError(f"'{run_dir}' holds no finished ships.json, sahara.json or eval.json (nor a run's stages)")
    parts = {}
    for name, read, build in (("ships", read_ships, ships_data), ("sahara", read_sahara, sahara_data),
                              ("eval", read_evaluation, eval_data)):
        if sources[name] is not None:
            parts[name] = build(read(sources[name]), sources[name])
    out = check_output_folder(out)
    written = []
    for name, data in parts.items():
        written.append(out / f"{name}_data.pt")
        _save(written[-1], {key: value for key, value in data.items() if key != "matrix"})
    experiment = run_dir / "experiment.json"
    if experiment.exists() and len(parts) == 3:
        mode = read_experiment(experiment)["config"].get("mode")
        written.append(out / "experiment_data.pt")
        _save(written[-1], {"ships_data": parts["ships"], "sahara_data": parts["sahara"],
                            "eval_data": parts["eval"], "config": {"quick_mode": mode == "quick"}})
    return written


def _check_out_apart(run_dir: Path, out: Path) -> None:
    """`out` is a new or empty folder outside the run (and not holding it): the seed layout's file names are our own
    runs' names (a run's ships_data.pt), so writing into the run, or over another folder's files, would replace them."""
    run, target = run_dir.resolve(), out.expanduser().resolve()
    if target == run or run in target.parents or target in run.parents:
        raise UserError(f"--out '{out}' overlaps the run folder '{run_dir}'; export writes into a new or empty folder "
                        "of its own, never into the run it reads")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out '{out}' is not empty; export writes into a new or empty folder (safety-heads never "
                        "writes among files it did not make)")


def _save(path: Path, data: dict) -> None:
    """torch.save as the notebook did (tuples stay tuples), atomically; only plain types, so weights_only loads it."""
    atomic_write(path, lambda stream: torch.save(data, stream))


def _find(run_dir: Path, name: str) -> Path | None:
    """`name`.json in the folder itself, or in a run's stage folder; only if finished (its checkpoint gone)."""
    stage = {"ships": "ships", "sahara": "sahara", "eval": "eval"}[name]
    for folder in (run_dir, run_dir / stage):
        if (folder / f"{name}.json").exists() and not (folder / f"{name}.checkpoint.jsonl").exists():
            return folder / f"{name}.json"
    return None


def _ranked(matrix: torch.Tensor) -> tuple[dict[str, float], list[tuple[int, int]], list[float]]:
    """{"layer,head": value} of the scored heads, and the heads and values best first."""
    scored = [((layer, head), float(matrix[layer, head])) for layer in range(matrix.shape[0])
              for head in range(matrix.shape[1]) if not torch.isnan(matrix[layer, head])]
    ordered = sorted(scored, key=lambda item: item[1], reverse=True)
    return ({f"{l},{h}": value for (l, h), value in scored}, [head for head, _ in ordered], [value for _, value in ordered])


def ships_data(result: ShipsResult, path: Path) -> dict:
    scores, heads, values = _ranked(result.mean)
    queries = [q.query for q in result.queries]
    query = queries[0] if len(queries) == 1 else f"mean over {len(queries)} queries: " + " | ".join(queries)
    layers, n_heads = result.mean.shape
    return {"scores": scores, "sorted_heads": heads, "sorted_scores": values, "query": query, "num_layers": layers,
            "num_heads": n_heads, "matrix": result.mean.nan_to_num(0.0).float()}


def sahara_data(result: SaharaResult, path: Path) -> dict:
    if not result.steps:
        raise UserError(f"'{path}' holds a group but no step's scores; export needs the sahara.json a search wrote")
    first = result.steps[0].scores
    shifts, heads, values = _ranked(first)
    layers, n_heads = first.shape
    return {"shifts": shifts, "sorted_shifts": heads, "sorted_scores": values, "safety_heads": list(result.heads),
            "num_layers": layers, "num_heads": n_heads, "matrix": first.nan_to_num(0.0).float()}


def eval_data(evaluation: Evaluation, path: Path) -> dict:
    judge = KEYWORD_JUDGES["seed"]
    samples = next(iter(evaluation.samples.values()), [])
    if not samples:
        raise UserError(f"'{path}' holds no answers to export")
    try:
        queries = [sample["query"] for sample in samples]
        sides = {side: [sample[side]["response"] for sample in samples] for side in ("baseline", "ablated")}
        heads = evaluation.heads or [tuple(samples[0]["heads"][0])]
        max_tokens = int(evaluation.config["generation"]["max_new_tokens"])
    except (KeyError, TypeError, IndexError) as error:
        raise UserError(f"'{path}' does not follow the safety-heads/eval layout ({type(error).__name__}: {error})") from None
    results = {side: list(zip(queries, responses, judge.judge(queries, responses))) for side, responses in sides.items()}
    rate = {side: sum(harmful for _, _, harmful in rows) / len(rows) if rows else 0.0 for side, rows in results.items()}
    return {"baseline_harm_rate": rate["baseline"], "ablated_harm_rate": rate["ablated"],
            "top_safety_head": tuple(int(x) for x in heads[0]), "baseline_results": results["baseline"],
            "ablated_results": results["ablated"], "num_queries": len(queries), "max_tokens": max_tokens}


__all__ = ["export_run", "LAYOUTS"]
