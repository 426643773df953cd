"""benchmarks/ground_truth.py: its hook ablation agrees with the package's weight surgery, its rank correlation is
Spearman's, and a small study on the demo model writes a consistent, resumable result."""

import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest

from safety_heads.data import format_prompts, load_prompts
from safety_heads.demo import DEMO_MODEL_PATH
from safety_heads.demo.measure import ablated_copy, generate
from safety_heads.models import ModelConfig, load_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ground_truth.py"


@pytest.fixture(scope="module")
def ground_truth():
    spec = importlib.util.spec_from_file_location("ground_truth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    return load_model(ModelConfig(model=str(DEMO_MODEL_PATH), device="cpu"))  # ground_truth.py's plain torch runs on the CPU


@pytest.mark.parametrize("kind, heads", [("ua", [(0, 1)]), ("sc", [(0, 1), (3, 2)]), ("ua", [(0, 6), (2, 3)])])
def test_hooks_generate_what_baked_weights_generate(ground_truth, demo, kind, heads):
    """Two independent ablations (forward hooks on the HF module vs bake_into_weights) give the same greedy answers."""
    ids = [list(p.token_ids) for p in format_prompts(load_prompts("maliciousinstruct", limit=12), "chat", demo.tokenizer)]
    with ground_truth.hooked(demo.module, heads, kind, demo.layout.head_dim):
        hooked = generate(demo.module, demo.tokenizer, ids, 16, 5)
    baked = generate(ablated_copy(demo, heads, kind), demo.tokenizer, ids, 16)
    clean = generate(demo.module, demo.tokenizer, ids, 16)
    assert hooked == baked
    assert hooked != clean  # the ablation did something (each of these changes at least one answer)
    assert generate(demo.module, demo.tokenizer, ids, 16) == clean  # and the hooks are gone


def test_package_answer_nll_matches_plain_torch(ground_truth, demo):
    """evaluate.answer_nll (engine batches, nnsight) against the script's plain-torch scoring of the same answers."""
    from safety_heads.demo.measure import harmless_sample
    from safety_heads.engine import Engine
    from safety_heads.evaluate import answer_nll

    prompts = format_prompts(harmless_sample(10), "chat", demo.tokenizer)
    ids = [list(p.token_ids) for p in prompts]
    with ground_truth.hooked(demo.module, [(0, 6)], "ua", demo.layout.head_dim):  # garbled answers, some short
        answers = generate(demo.module, demo.tokenizer, ids, 16, 4)
    answers[3] = ""  # an empty answer is not scored
    package = answer_nll(Engine(demo), demo.tokenizer, prompts, answers)
    assert package[3] is None
    scored = [v for v in package if v is not None]
    plain = ground_truth.clean_answer_nll(demo.module, demo.tokenizer, ids, answers, 3)
    assert sum(scored) / len(scored) == pytest.approx(plain, rel=1e-5)


def test_auroc_matches_hand_computed_values(ground_truth):
    assert ground_truth.auroc([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == 1.0
    assert ground_truth.auroc([0.9, 0.2, 0.1, 0.8], [False, False, True, True]) == 0.25
    assert ground_truth.auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5  # ties count half
    assert math.isnan(ground_truth.auroc([1.0, 2.0], [True, True]))


def test_spearman_matches_hand_computed_values(ground_truth):
    assert ground_truth.average_ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert ground_truth.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ground_truth.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: ranks x = 1,2,3,4 and y = 1.5,1.5,3,4 -> Pearson of the ranks
    assert ground_truth.spearman([1, 2, 3, 4], [5, 5, 6, 7]) == pytest.approx(0.9486832980505138)
    assert math.isnan(ground_truth.spearman([1, 2, 3], [5, 5, 5]))


def test_small_study_is_consistent_and_refuses_to_overwrite(ground_truth, tmp_path, capsys):
    out = tmp_path / "gt"
    argv = ["--heads", "0:0-3", "--score-limit", "6", "--eval-limit", "4", "--harmless", "6", "--beam", "2",
            "--max-new-tokens", "12", "--threads", "1", "--out", str(out)]
    assert ground_truth.main(argv) == 0
    result = json.loads((out / "ground_truth.json").read_text())
    assert not (out / "ground_truth.checkpoint.jsonl").exists()
    candidates = [f"0:{h}" for h in range(4)]
    assert [e["heads"] for e in result["singles"]] == candidates
    assert [e["heads"] for e in result["pairs"]] == [",".join(p) for p in itertools.combinations(candidates, 2)]
    assert result["config"]["n_harmful"] == 8 and result["config"]["n_harmless"] == 6
    for entry in [result["clean"], *result["singles"], *result["pairs"], *result["triples"]]:
        assert entry["asr"] == pytest.approx(100 * entry["harmful_not_refused"] / 8)
        assert entry["harmless_answered"] == pytest.approx(100 * entry["harmless_complied"] / 6)
        assert entry["asr_coherent"] <= entry["asr"] + 1e-9  # a coherent compliance is never a refusal
        assert entry["harmless_nll"] > 0
    check = result["answer_nll_check"]
    assert check["groups"] == len(result["singles"]) + len(result["pairs"]) + len(result["triples"])
    assert check["flagged_below_floor"] <= check["below_floor"]
    sahara = result["sahara_heads"].split(",")
    assert len(sahara) == 3 and set(sahara) <= set(candidates)
    for k, comparison in result["comparison"].items():
        group = comparison["sahara"]["heads"].split(",")
        assert sorted(group) == sorted(sahara[: int(k)])
        best = comparison["best_without_floor"]
        assert best["asr"] >= comparison["sahara"]["asr"] and best["asr"] >= comparison["ships"]["asr"]
        if comparison["best"] is not None:
            assert comparison["best"]["harmless_answered"] >= 80
            assert comparison["sahara_gap"] == pytest.approx(comparison["best"]["asr"] - comparison["sahara"]["asr"])
    guarded = result["sahara_guard_heads"].split(",")
    assert 1 <= len(guarded) <= 3 and set(guarded) <= set(candidates)
    for k, comparison in result["comparison"].items():
        if int(k) <= len(guarded):
            assert sorted(comparison["sahara_guard"]["heads"].split(",")) == sorted(guarded[: int(k)])
            assert comparison["sahara_guard"]["asr"] <= comparison["best_without_floor"]["asr"]
    assert "| Sahara --guard harmless-val |" in (out / "ground_truth.md").read_text()
    assert (out / "ground_truth.md").read_text() in capsys.readouterr().out
    assert ground_truth.main(argv) == 2  # a finished study is never overwritten
    assert "already holds a finished study" in capsys.readouterr().err


def test_interrupted_study_resumes_without_measuring_again(ground_truth, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gt"
    argv = ["--heads", "1:0-2", "--score-limit", "4", "--eval-limit", "2", "--harmless", "4", "--beam", "1",
            "--max-new-tokens", "8", "--threads", "1", "--out", str(out)]
    real, calls = ground_truth.outcome, []

    def failing_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(ground_truth, "outcome", failing_after_two)
    assert ground_truth.main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    lines = (out / "ground_truth.checkpoint.jsonl").read_text().splitlines()
    assert len(lines) == 3  # the header and the two measured head sets

    measured = []
    monkeypatch.setattr(ground_truth, "outcome", lambda *args, **kwargs: measured.append(args[3]) or real(*args, **kwargs))
    assert ground_truth.main(argv) == 0
    singles = [[(1, h)] for h in range(3)]
    pairs = [[(1, 0), (1, 1)], [(1, 0), (1, 2)], [(1, 1), (1, 2)]]
    assert [list(h) for h in calls] == [[], singles[0]]
    assert [list(h) for h in measured] == singles[1:] + pairs + [[(1, 0), (1, 1), (1, 2)]]
