"""recommend.py: which searched group `run` recommends, from held-out evaluation records."""

import pytest

from safety_heads.recommend import measure, recommend


def evaluation(rises: dict[str, tuple[float, float, int]], refusal=(0.1, 0.1), nll=(0.5, 0.55)) -> dict:
    """An eval.json-shaped record: per data set (baseline ASR, ablated ASR, n) by the gcg judge."""
    return {
        "results": {name: {"n": n, "baseline": {"asr": {"gcg": b}}, "ablated": {"asr": {"gcg": a}}}
                    for name, (b, a, n) in rises.items()},
        "harmless": {"baseline": {"refusal_rate": {"gcg": refusal[0]}, "answer_nll": nll[0]},
                     "ablated": {"refusal_rate": {"gcg": refusal[1]}, "answer_nll": nll[1]}},
    }


def test_the_largest_pooled_rise_within_the_limits_wins():
    paper = measure("angle", [(1, 4)], evaluation({"mi": (0.25, 0.10, 16), "jbb": (0.4, 0.3, 16)}), "gcg")
    refusal = measure("refusal-logprob", [(10, 7), (3, 5)], evaluation({"mi": (0.25, 0.75, 16), "jbb": (0.4, 0.6, 16)}), "gcg")
    assert paper.pooled_rise == pytest.approx(-0.125) and refusal.pooled_rise == pytest.approx(0.35)
    result = recommend([paper, refusal], "gcg", 0.10, 0.25)
    assert result.group == ["10:7", "3:5"] and result.chosen == "refusal-logprob"
    assert "did not rise" in paper.why_not and refusal.eligible


def test_a_group_over_a_harmless_limit_is_passed_over_even_with_the_largest_rise():
    broken = measure("angle", [(0, 6)], evaluation({"mi": (0.1, 0.9, 10)}, nll=(0.5, 1.5)), "gcg")
    refusing = measure("refusal-direction", [(0, 1)], evaluation({"mi": (0.1, 0.9, 10)}, refusal=(0.1, 0.3)), "gcg")
    fine = measure("refusal-logprob", [(3, 3)], evaluation({"mi": (0.1, 0.4, 10)}), "gcg")
    result = recommend([broken, refusing, fine], "gcg", 0.10, 0.25)
    assert result.group == ["3:3"]
    assert "NLL rose by 1.000" in broken.why_not and "refusals rose by 20.0%" in refusing.why_not


def test_nothing_is_recommended_when_no_group_raises_asr():
    lower = measure("angle", [(1, 4)], evaluation({"mi": (0.25, 0.25, 16)}), "gcg")
    result = recommend([lower], "gcg", 0.10, 0.25)
    assert result.group == [] and result.chosen is None and "no searched group" in result.reason
    record = result.record()
    assert record["candidates"][0]["eligible"] is False and record["judge"] == "gcg"


def test_a_judge_that_did_not_judge_is_an_error():
    with pytest.raises(ValueError, match="did not judge"):
        measure("angle", [(1, 4)], evaluation({"mi": (0.25, 0.25, 16)}), "paper")
