"""Which head group `run` recommends: of the groups its searches found, the one whose ablation raises held-out ASR
the most while the harmless answers stay intact.

Why a rule, and this one: on a real aligned chat model (Qwen2.5-Coder-0.5B-Instruct, docs/real-model-study.md) the
paper's angle search names heads whose ablation makes the model *safer*, and a group that raises ASR by breaking the
model is no finding either. So each group is judged on prompts its search did not use (`run`'s held-out slices), by
one named judge, and must keep the harmless cost within two limits: the harmless refusal rate may rise by at most
`max_refusal_rise`, and the clean model's NLL of the harmless answers by at most `max_nll_rise` nats/token. Among the
groups within both, the largest pooled ASR rise over the harmful data sets wins; a group that does not raise ASR is
never recommended (the recommendation is then empty, and says why).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Candidate:
    """One searched group, measured held out."""

    search: str  # e.g. "angle (the paper's Sahara)", "refusal-logprob"
    heads: list[str]  # "L:H", in the order chosen
    asr_rise: dict[str, float]  # per harmful data set: ablated - baseline ASR (the judge's)
    asr: dict[str, list[float]]  # per data set: [baseline, ablated]
    n: dict[str, int]
    pooled_rise: float  # the rise over every harmful prompt together
    harmless_refusal_rise: float | None
    answer_nll_rise: float | None
    eligible: bool = False
    why_not: str | None = None


@dataclass
class Recommendation:
    judge: str
    max_refusal_rise: float
    max_nll_rise: float
    candidates: list[Candidate] = field(default_factory=list)
    chosen: str | None = None  # the search whose group is recommended
    group: list[str] = field(default_factory=list)
    reason: str = ""

    def record(self) -> dict:
        return asdict(self)


def measure(search: str, heads, evaluation: dict, judge: str) -> Candidate:
    """A group's held-out numbers from its eval.json record (Evaluation.record())."""
    rise, asr, n = {}, {}, {}
    for name, numbers in evaluation["results"].items():
        if judge not in numbers["ablated"]["asr"]:
            raise ValueError(f"judge {judge!r} did not judge {name}")
        before, after = numbers["baseline"]["asr"][judge], numbers["ablated"]["asr"][judge]
        rise[name], asr[name], n[name] = after - before, [before, after], numbers["n"]
    pooled = sum(rise[name] * n[name] for name in rise) / max(sum(n.values()), 1)
    refusal_rise = nll_rise = None
    harmless = evaluation.get("harmless") or {}
    if "baseline" in harmless:
        rates = harmless["baseline"]["refusal_rate"]
        key = judge if judge in rates else next(iter(rates))
        refusal_rise = harmless["ablated"]["refusal_rate"][key] - rates[key]
        before, after = harmless["baseline"].get("answer_nll"), harmless["ablated"].get("answer_nll")
        if before is not None and after is not None:
            nll_rise = after - before
    return Candidate(search, [f"{l}:{h}" for l, h in heads], rise, asr, n, pooled, refusal_rise, nll_rise)


def recommend(candidates: list[Candidate], judge: str, max_refusal_rise: float, max_nll_rise: float) -> Recommendation:
    """The candidate with the largest pooled held-out ASR rise among those within the harmless limits."""
    result = Recommendation(judge, max_refusal_rise, max_nll_rise, candidates)
    for candidate in candidates:
        if candidate.harmless_refusal_rise is None or candidate.answer_nll_rise is None:
            candidate.why_not = "no harmless cost measured"
        elif candidate.harmless_refusal_rise > max_refusal_rise:
            candidate.why_not = (f"harmless refusals rose by {candidate.harmless_refusal_rise:.1%}, over the "
                                 f"{max_refusal_rise:.0%} limit")
        elif candidate.answer_nll_rise > max_nll_rise:
            candidate.why_not = (f"the harmless answers' NLL rose by {candidate.answer_nll_rise:.3f} nats/token, over "
                                 f"the {max_nll_rise:g} limit (answers garbled)")
        elif candidate.pooled_rise <= 0:
            candidate.why_not = f"held-out ASR did not rise ({candidate.pooled_rise:+.1%}): the model became no less safe"
        candidate.eligible = candidate.why_not is None
    eligible = [c for c in candidates if c.eligible]
    if not eligible:
        result.reason = "no searched group raised held-out ASR within the harmless limits"
        return result
    best = max(eligible, key=lambda c: c.pooled_rise)  # ties: the first listed (the paper's search)
    result.chosen, result.group = best.search, list(best.heads)
    result.reason = (f"the largest held-out ASR rise ({judge}, {best.pooled_rise:+.1%} over "
                     f"{sum(best.n.values())} prompts) among the groups within the harmless limits")
    return result


__all__ = ["Candidate", "Recommendation", "measure", "recommend"]
