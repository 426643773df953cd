"""A study's own files (`safety-heads run`): experiment.json, the report, and the notebook-style files compiled at the
top of its folder from its stages' results. Each stage's own files are its runs module's (ships.py, sahara.py,
evaluate.py); experiment.py runs the stages, this writes what joins them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..evaluate import Evaluation
from ..report import RunRecords, build_report
from ..sahara import SaharaResult
from ..ships import ShipsResult
from .evaluate import evaluation_tensors
from .files import read_record, save_tensors, to_jsonable, write_json
from .sahara import sahara_record, sahara_tensors
from .ships import ships_record, ships_tensors

FORMAT, FORMAT_VERSION = "safety-heads/experiment", 1


@dataclass
class Study:
    """A finished study: experiment.json's record (built by experiment.py), the stages' JSON records (what their files
    hold, made once: the recommendation, experiment.json and the report read them) and the typed results the
    notebook-style files are compiled from."""

    record: dict
    title: str
    records: RunRecords
    ships: ShipsResult
    sahara: SaharaResult
    evaluation: Evaluation
    per_query: Evaluation
    timings: dict[str, float]  # seconds of each stage run in this process


def run_records(ships: ShipsResult, sahara: SaharaResult, evaluation: Evaluation, per_query: Evaluation,
                refusal: tuple[SaharaResult, Evaluation] | None) -> RunRecords:
    """Each stage's JSON record, as its file holds it (the refusal search's group and evaluation, when it ran)."""
    return RunRecords(to_jsonable(ships_record(ships)), to_jsonable(sahara_record(sahara)), to_jsonable(evaluation.record()),
                      to_jsonable(per_query.record()),
                      {"sahara": to_jsonable(sahara_record(refusal[0])), "evaluation": to_jsonable(refusal[1].record())}
                      if refusal else None)


def write_outputs(study: Study, out: Path) -> None:
    """The report, the notebook-style files at the top of the folder, and experiment.json; the caller then removes the
    run's checkpoint, the last write."""
    build_report(out, study.records, title=study.title, timings=study.timings)
    compiled = {"ships": ships_tensors(study.ships), "sahara": sahara_tensors(study.sahara),
                "eval": evaluation_tensors(study.evaluation), "eval_per_query": evaluation_tensors(study.per_query)}
    compiled = {name: to_jsonable(tensors, keep_tensors=True) for name, tensors in compiled.items()}
    for name in ("ships", "sahara", "eval"):
        save_tensors(out / f"{name}_data.pt", compiled[name])  # where the original notebook's users look
    write_json(out / "experiment.json", study.record)
    save_tensors(out / "experiment_data.pt", {**compiled, "experiment": study.record})


def read_experiment(path: str | Path) -> dict:
    """experiment.json's record: the study's settings and its headline numbers (each stage's own file, read by its own
    reader, holds the rest)."""
    def checked(record: dict) -> dict:
        if not isinstance(record["config"], dict):
            raise TypeError("config is not an object")
        return record

    return read_record(path, {FORMAT: checked})


__all__ = ["Study", "run_records", "write_outputs", "read_experiment", "FORMAT", "FORMAT_VERSION"]
