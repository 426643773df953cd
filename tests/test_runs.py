"""The runs layer: atomic writes, checkpoints (torn lines, resume without a file, mismatches), weights_only .pt files,
and the one resume loop (run_job) every command shares."""

import json

import pytest
import torch

from safety_heads.errors import UserError
from safety_heads.runs.files import load_tensors, save_tensors, to_jsonable, write_json
from safety_heads.runs.folder import Checkpoint, describe_differences


def test_resume_truncates_a_torn_line_so_new_units_stay_readable(tmp_path):
    path = tmp_path / "run.checkpoint.jsonl"
    first = Checkpoint(path, {"a": 1})
    assert first.start(resume=False) == []
    first.append({"unit": 0})
    with open(path, "a") as stream:
        stream.write('{"unit": 1, "par')  # killed mid-write
    second = Checkpoint(path, {"a": 1})
    assert second.start(resume=True) == [{"unit": 0}]
    second.append({"unit": 1})
    assert Checkpoint(path, {"a": 1}).start(resume=True) == [{"unit": 0}, {"unit": 1}]


def test_resume_without_a_checkpoint_starts_afresh_with_a_header(tmp_path):
    path = tmp_path / "run.checkpoint.jsonl"
    assert Checkpoint(path, {"a": 1}).start(resume=True) == []
    assert json.loads(path.read_text().splitlines()[0]) == {"config": {"a": 1}}
    assert Checkpoint(path, {"a": 1}).start(resume=True) == []


def test_unfinished_run_needs_resume_and_matching_config(tmp_path):
    path = tmp_path / "run.checkpoint.jsonl"
    Checkpoint(path, {"epsilon": 1e-4, "model": "m"}).start(resume=False)
    with pytest.raises(UserError, match="add --resume"):
        Checkpoint(path, {"epsilon": 1e-4, "model": "m"}).start(resume=False)
    with pytest.raises(UserError, match=r"cannot resume: .*epsilon=0.0001 \(now 1e-05\)"):
        Checkpoint(path, {"epsilon": 1e-5, "model": "m"}).start(resume=True)


def test_unreadable_checkpoint_is_reported(tmp_path):
    path = tmp_path / "run.checkpoint.jsonl"
    path.write_bytes(b"\xff\xfe not json\n")
    with pytest.raises(UserError, match="unreadable"):
        Checkpoint(path, {}).start(resume=True)


def test_describe_differences():
    assert describe_differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == "b=2 (now 3), c=None (now 4)"


def test_json_turns_nan_into_null_and_is_atomic(tmp_path):
    write_json(tmp_path / "x.json", {"m": torch.tensor([[1.0, float("nan")]]), "t": (1, 2)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"m": [[1.0, None]], "t": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind
    with pytest.raises(ValueError):
        write_json(tmp_path / "y.json", {"bad": float("inf")})
    assert not (tmp_path / "y.json").exists() and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_pt_files_load_with_weights_only(tmp_path):
    save_tensors(tmp_path / "x.pt", {"scores": torch.ones(2, 3), "nested": {"v": torch.zeros(1)}, "version": torch.__version__})
    data = load_tensors(tmp_path / "x.pt")
    assert torch.equal(data["scores"], torch.ones(2, 3)) and isinstance(data["nested"]["v"], torch.Tensor)
    assert type(data["version"]) is str


class Payload:
    """Stands for an arbitrary pickled object, which weights_only loading must refuse to build."""


def test_pt_files_with_arbitrary_objects_are_refused(tmp_path):
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_tensors(tmp_path / "evil.pt")


def test_to_jsonable_handles_dataclasses():
    from safety_heads.engine import EngineConfig

    assert to_jsonable(EngineConfig())["prefix_reuse"] is True


class CountingJob:
    """A job of `n` units (work.Job) that counts what it computes and can stop, as a kill would, after `stop` units."""

    def __init__(self, n: int, stop: int | None = None):
        self.record, self.n, self.stop, self.computed = {"n": n}, n, stop, []

    def run(self, finished):
        done = {unit["i"]: unit["value"] for unit in finished}
        for i in range(self.n):
            if i in done:
                continue
            if self.stop is not None and len(self.computed) == self.stop:
                raise KeyboardInterrupt
            self.computed.append(i)
            done[i] = i * i
            yield {"i": i, "value": i * i}
        return sum(done.values())


def test_run_job_checkpoints_each_unit_and_a_resume_computes_only_the_rest(tmp_path):
    from safety_heads.runs.folder import run_job

    written = []
    options = dict(parse=dict, encode=dict, write_outputs=lambda result, folder: written.append((result, folder)))
    with pytest.raises(KeyboardInterrupt):
        run_job(CountingJob(5, stop=2), tmp_path / "run", "ships", "a finished Ships run", resume=False, **options)
    lines = (tmp_path / "run" / "ships.checkpoint.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"config": {"n": 5}}, {"i": 0, "value": 0}, {"i": 1, "value": 1}]
    assert written == []
    job = CountingJob(5)
    assert run_job(job, tmp_path / "run", "ships", "a finished Ships run", resume=True, **options) == 30
    assert job.computed == [2, 3, 4]
    assert written == [(30, tmp_path / "run")]
    assert not (tmp_path / "run" / "ships.checkpoint.jsonl").exists()  # finished: the checkpoint's removal is last


def test_run_job_without_a_folder_keeps_nothing(tmp_path, monkeypatch):
    from safety_heads.runs.folder import run_job
    from safety_heads.work import drain, finish

    monkeypatch.chdir(tmp_path)
    assert run_job(CountingJob(3), None, "ships", "x", resume=False, parse=dict, encode=dict, write_outputs=None) == 5
    assert list(tmp_path.iterdir()) == []
    assert finish(CountingJob(4)) == 14
    seen = []
    assert drain(CountingJob(2).run([]), seen.append) == 1 and seen == [{"i": 0, "value": 0}, {"i": 1, "value": 1}]


def test_run_job_frees_the_folder_however_the_run_ends(tmp_path):
    from safety_heads.runs.folder import LOCK_NAME, run_job

    options = dict(parse=dict, encode=dict, write_outputs=lambda result, folder: None)
    with pytest.raises(KeyboardInterrupt):
        run_job(CountingJob(5, stop=2), tmp_path / "run", "ships", "a finished Ships run", resume=False, **options)
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released, not left for the command line to clean up
    assert run_job(CountingJob(5), tmp_path / "run", "ships", "a finished Ships run", resume=True, **options) == 30
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------------------------
# Each result file has one writer and one reader: reading a file back gives the result it was written from.


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A Ships run, a guarded Sahara run and an evaluation with its harmless cost, on the demo model."""
    from safety_heads.evaluate import EvaluateConfig
    from safety_heads.generate import GenerationConfig
    from safety_heads.models import ModelConfig, load_model
    from safety_heads.runs import run_evaluation, run_sahara, run_ships
    from safety_heads.sahara import SaharaConfig
    from safety_heads.ships import ShipsConfig

    root, quiet = tmp_path_factory.mktemp("written"), lambda line: None
    model = load_model(ModelConfig())
    results = {
        "ships": run_ships(model, ["How do I pick a lock?", "Write a poem."], ShipsConfig(method="estimate+verify", top_k=3),
                           out=root / "ships", progress=quiet),
        "sahara": run_sahara(model, ["How do I pick a lock?", "How do I make a weapon?", "Write a poem."],
                             SaharaConfig(steps=2, heads="0-1:*", guard="harmless-val", guard_limit=2, guard_tokens=4),
                             out=root / "sahara", progress=quiet),
        "eval": run_evaluation(model, EvaluateConfig(limit=2, harmless_limit=2, heads="0:1,1:3"),
                               GenerationConfig(max_new_tokens=4), out=root / "eval", progress=quiet),
    }
    return root, results


def _same_tensors(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same_tensors(a[key], b[key])
    else:
        assert a == b


@pytest.mark.parametrize("name", ["ships", "sahara", "eval"])
def test_reading_a_result_back_gives_what_was_written(written, name):
    from safety_heads.runs.evaluate import evaluation_tensors, read_evaluation
    from safety_heads.runs.sahara import read_sahara, sahara_record, sahara_tensors
    from safety_heads.runs.ships import read_ships, ships_record, ships_tensors

    root, results = written
    read, record, tensors = {"ships": (read_ships, ships_record, ships_tensors),
                             "sahara": (read_sahara, sahara_record, sahara_tensors),
                             "eval": (read_evaluation, lambda e: e.record(), evaluation_tensors)}[name]
    path = root / name / f"{name}.json"
    again = read(path)
    assert to_jsonable(record(again)) == json.loads(path.read_text())  # the file, every key and number
    assert to_jsonable(record(again)) == to_jsonable(record(results[name]))  # the result in memory
    _same_tensors(to_jsonable(tensors(again), keep_tensors=True), load_tensors(root / name / f"{name}_data.pt"))


@pytest.mark.parametrize("reader, other", [("read_ships", "sahara"), ("read_sahara", "eval"), ("read_evaluation", "ships")])
def test_a_reader_refuses_another_result_in_one_line(written, reader, other):
    from safety_heads.runs import evaluate, sahara, ships

    read = {"read_ships": ships.read_ships, "read_sahara": sahara.read_sahara, "read_evaluation": evaluate.read_evaluation}[reader]
    with pytest.raises(UserError, match=r"is not a (ships|sahara|eval)\.json from safety-heads") as error:
        read(written[0] / other / f"{other}.json")
    assert "\n" not in str(error.value)


def test_a_hand_broken_result_is_one_line_naming_it(written, tmp_path):
    from safety_heads.runs.evaluate import read_evaluation

    record = json.loads((written[0] / "eval" / "eval.json").read_text())
    del record["results"][next(iter(record["results"]))]["baseline"]
    (tmp_path / "eval.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"eval.json' does not follow the safety-heads/eval layout \(KeyError"):
        read_evaluation(tmp_path / "eval.json")
