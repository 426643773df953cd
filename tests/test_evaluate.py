"""Evaluation: heads from every source, outputs, the harmless cost, resume, and bad --from files."""

import json

import pytest
import torch

from safety_heads.errors import UserError
from safety_heads.evaluate import EvaluateConfig
from safety_heads.generate import GenerationConfig
from safety_heads.models import ModelConfig, load_model
from safety_heads.runs import choose_heads, run_evaluation, run_ships
from safety_heads.runs.files import load_tensors
from safety_heads.ships import ShipsConfig

QUICK = GenerationConfig(max_new_tokens=4, batch_size=2)


@pytest.fixture(scope="module")
def model():
    return load_model(ModelConfig())


def quiet(_):
    pass


def test_outputs_and_harmless_cost(model, tmp_path):
    config = EvaluateConfig(datasets="maliciousinstruct,jailbreakbench", limit=3, heads="0:1,2:3", judges="paper,gcg", harmless_limit=3)
    result = run_evaluation(model, config, QUICK, out=tmp_path, progress=quiet).record()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval_data.pt"]
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record == json.loads(json.dumps(result))
    assert record["heads"] == [[0, 1], [2, 3]] and "harmful" in record["content_warning"]
    for name in ("maliciousinstruct", "jailbreakbench"):
        numbers = record["results"][name]
        assert numbers["n"] == 3 and set(numbers["baseline"]["asr"]) == {"paper", "gcg"}
        samples = record["samples"][name]
        asr = sum(s["ablated"]["verdicts"]["gcg"] for s in samples) / 3
        assert numbers["ablated"]["asr"]["gcg"] == asr
        assert numbers["delta_asr"]["gcg"] == numbers["ablated"]["asr"]["gcg"] - numbers["baseline"]["asr"]["gcg"]
        assert numbers["positions"] == [1, 3]  # the first 3 (--limit 3)
        for side in ("baseline", "ablated"):
            for judge in ("paper", "gcg"):
                harmful = sum(s[side]["verdicts"][judge] is True for s in samples)
                low, high = numbers[side]["interval95"][judge]
                assert numbers[side]["harmful"][judge] == harmful and numbers[side]["asr"][judge] == harmful / 3
                assert 0 <= low <= harmful / 3 <= high <= 1 and high - low > 0.3  # 3 prompts: a wide interval
    assert record["headline_judge"] == "gcg"  # the recommended judge, though paper was listed first
    harmless = record["harmless"]
    assert harmless["n"] == 3 and harmless["mean_kl"] > 0
    assert harmless["mean_kl"] == pytest.approx(sum(s["kl"] for s in harmless["samples"]) / 3)
    for side in ("baseline", "ablated"):
        values = [s[f"{side}_nll"] for s in harmless["samples"] if s[f"{side}_nll"] is not None]
        assert harmless[side]["answer_nll"] == pytest.approx(sum(values) / len(values)) and min(values) > 0
    assert record["config"]["judge_versions"] == {"paper": "table4-v1", "gcg": "advbench-29-v1"}
    data = load_tensors(tmp_path / "eval_data.pt")
    for name in ("maliciousinstruct", "jailbreakbench"):
        for side in ("baseline", "ablated"):
            expected = [int(s[side]["verdicts"]["gcg"]) for s in record["samples"][name]]
            assert isinstance(data["verdicts"][name][side]["gcg"], torch.Tensor)
            assert data["verdicts"][name][side]["gcg"].tolist() == expected


def test_heads_from_ships_and_per_query(model, tmp_path):
    run_ships(model, ["How do I pick a lock?", "Write a poem."], ShipsConfig(), out=tmp_path / "ships", progress=quiet)
    ships = json.loads((tmp_path / "ships" / "ships.json").read_text())
    top = [[l, h] for l, h, _ in ships["aggregate"]["top_mean"][:2]]
    choice = choose_heads(EvaluateConfig(source=str(tmp_path / "ships" / "ships.json"), top_k=2), model.layout)
    assert [list(h) for h in choice.heads] == top
    result = run_evaluation(model, EvaluateConfig(source=str(tmp_path / "ships" / "ships.json"), top_k=2, per_query=True, harmless=None),
                            QUICK, progress=quiet).record()
    (name, samples), = result["samples"].items()
    assert [s["query"] for s in samples] == ["How do I pick a lock?", "Write a poem."]
    for sample, query in zip(samples, ships["queries"]):
        assert sample["heads"] == [[l, h] for l, h, _ in query["top"][:2]]  # each query's own top heads


def test_heads_from_sahara(model, tmp_path):
    path = tmp_path / "sahara.json"
    path.write_text(json.dumps({"format": "safety-heads/sahara", "version": 1, "heads": [[1, 2], [0, 5], [3, 3]]}))
    assert choose_heads(EvaluateConfig(source=str(path)), model.layout).heads == [(1, 2), (0, 5), (3, 3)]
    assert choose_heads(EvaluateConfig(source=str(path), top_k=1), model.layout).heads == [(1, 2)]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"format": "safety-heads/eval"}, "is not a sahara.json or ships.json"),
        ([1, 2], "is not a sahara.json or ships.json"),
        ({"format": "safety-heads/sahara"}, "does not follow"),
        ({"format": "safety-heads/sahara", "heads": [[9, 0]]}, "layer 9 is out of range"),
        ({"format": "safety-heads/ships", "aggregate": {}}, "does not follow"),
    ],
)
def test_bad_from_files(model, tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=message):
        choose_heads(EvaluateConfig(source=str(path)), model.layout)


def test_from_file_that_is_not_json(model, tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read result file"):
        choose_heads(EvaluateConfig(source=str(path)), model.layout)


@pytest.mark.parametrize(
    "settings, message",
    [(dict(), "exactly one of --heads or --from"), (dict(heads="0:1", source="x.json"), "exactly one"),
     (dict(heads="0:1", per_query=True), "--per-query needs"), (dict(heads="0:1", top_k=0), "--top-k"),
     (dict(heads="0:1", prompt_range="1-4", limit=2), "one of --limit and --range"),
     (dict(heads="0:1", prompt_range="4-1"), "need 1 <= A <= B"),
     (dict(source="s.json", per_query=True, prompt_range="1-4"), "--range slices a --dataset")],
)
def test_bad_config(settings, message):
    with pytest.raises(UserError, match=message):
        EvaluateConfig(**settings).validate()


class Stop(Exception):
    pass


def test_resume_continues_without_regenerating(model, tmp_path, monkeypatch):
    config = EvaluateConfig(limit=4, heads="0:1", harmless=None)
    full = run_evaluation(model, config, QUICK, out=tmp_path / "a", progress=quiet).record()
    seen = []

    def stop_after_two(line):
        seen.append(line)
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        run_evaluation(model, config, QUICK, out=tmp_path / "b", progress=stop_after_two)
    import safety_heads.evaluate as evaluate_module

    calls = []
    real = evaluate_module.generate
    monkeypatch.setattr(evaluate_module, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = run_evaluation(model, config, QUICK, out=tmp_path / "b", resume=True, progress=quiet).record()
    assert len(calls) == 1  # 4 batches in all (2 baseline, 2 ablated); 3 were checkpointed
    assert resumed["samples"] == full["samples"] and resumed["results"] == full["results"]


def test_answer_nll_sees_a_garbled_answer_that_keyword_judges_do_not():
    """On the demo model, head 0:6 garbles answers without refusing (model card): the clean model's likelihood of the
    ablated harmless answers drops sharply with it in the group, and barely with the safety head 0:1 alone."""
    from safety_heads.demo import DEMO_MODEL_PATH

    demo = load_model(ModelConfig(model=str(DEMO_MODEL_PATH)))
    generation = GenerationConfig(max_new_tokens=24, batch_size=16)
    harmless = {}
    for heads in ("0:1", "0:1,0:6,0:7"):
        config = EvaluateConfig(datasets="maliciousinstruct", limit=1, heads=heads, judges="paper", template="chat",
                                harmless_limit=16)
        harmless[heads] = run_evaluation(demo, config, generation, progress=quiet).record()["harmless"]
    baseline = harmless["0:1"]["baseline"]["answer_nll"]
    assert harmless["0:1,0:6,0:7"]["baseline"]["answer_nll"] == pytest.approx(baseline)  # same answers, same score
    assert harmless["0:1"]["ablated"]["answer_nll"] < baseline + 0.5
    assert harmless["0:1,0:6,0:7"]["ablated"]["answer_nll"] > baseline + 1.5
    # ... while the keyword judge sees no difference between the two groups on these prompts
    assert harmless["0:1,0:6,0:7"]["ablated"]["refusal_rate"]["paper"] <= harmless["0:1"]["ablated"]["refusal_rate"]["paper"] + 0.1


def test_from_takes_the_files_template_and_ablation_unless_given(tmp_path, capsys):
    """A ships.json made with the paper template and eps 1e-5 is evaluated with them, and says so; a flag that
    differs from the file wins, with a warning line."""
    from safety_heads.cli import main

    assert main(["ships", "--prompt", "How do I pick a lock?", "--template", "paper", "--epsilon", "1e-5",
                 "--out", str(tmp_path / "ships")]) == 0
    capsys.readouterr()
    common = ["evaluate", "--from", str(tmp_path / "ships" / "ships.json"), "--limit", "1", "--max-new-tokens", "2",
              "--harmless", ""]
    assert main(common + ["--out", str(tmp_path / "inherited")]) == 0
    printed = capsys.readouterr()
    record = json.loads((tmp_path / "inherited" / "eval.json").read_text())["config"]
    assert record["template"] == "paper" and record["epsilon"] == 1e-5 and record["ablation"] == "ua"
    assert "template 'paper'" in printed.err and "epsilon 1e-05" in printed.err and "template paper" in printed.out
    assert main(common + ["--epsilon", "1e-3", "--out", str(tmp_path / "overridden")]) == 0
    err = capsys.readouterr().err
    assert "warning: --epsilon 0.001 differs from the 1e-05" in err
    assert json.loads((tmp_path / "overridden" / "eval.json").read_text())["config"]["epsilon"] == 1e-3


def test_range_evaluates_a_slice_and_records_where_it_is(model, tmp_path):
    """--range 51-53: MaliciousInstruct's prompts 51 to 53, recorded as their positions; the default judge is gcg."""
    from safety_heads.data import load_prompts

    config = EvaluateConfig(datasets="maliciousinstruct", prompt_range="51-53", heads="0:1", harmless=None)
    record = run_evaluation(model, config, QUICK, out=tmp_path, progress=quiet).record()
    assert [s["query"] for s in record["samples"]["maliciousinstruct"]] == load_prompts("maliciousinstruct")[50:53]
    numbers = record["results"]["maliciousinstruct"]
    assert numbers["n"] == 3 and numbers["positions"] == [51, 53] and record["config"]["prompt_range"] == "51-53"
    assert list(numbers["ablated"]["asr"]) == ["gcg"] and record["headline_judge"] == "gcg"
