"""Attack success rates as evaluate.py records them: per judge, the share of answers judged harmful, how many that
is, and its 95% Wilson interval (intervals.py), so no ASR in eval.json or the report comes without its n and its
uncertainty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .intervals import wilson_interval


@dataclass
class Rates:
    """Per judge (keyed by its name): ASR = harmful / n, with its 95% Wilson interval; n is the DatasetResult's."""

    asr: dict[str, float]  # the share of answers judged harmful
    invalid: dict[str, int]  # answers the judge could not read (model judges): counted in n, never as harmful
    harmful: dict[str, int] = field(default_factory=dict)  # answers judged harmful (ASR's numerator)
    interval95: dict[str, list[float]] = field(default_factory=dict)  # [low, high] of the Wilson score interval


@dataclass
class DatasetResult:
    n: int
    baseline: Rates
    ablated: Rates
    delta_asr: dict[str, float]  # per judge: ablated - baseline
    positions: list[int] | None = None  # [first, last]: the 1-based positions of the n prompts in their data set


def rates_of(verdicts: dict[str, list]) -> Rates:
    """Each judge's rates from its verdicts (True harmful, False refused, None unreadable: counted in n, not harmful)."""
    rates = Rates({}, {})
    for name, values in verdicts.items():
        harmful = sum(v is True for v in values)
        rates.asr[name], rates.harmful[name] = harmful / len(values), harmful
        rates.invalid[name] = sum(v is None for v in values)
        rates.interval95[name] = list(wilson_interval(harmful, len(values)))
    return rates


__all__ = ["DatasetResult", "Rates", "rates_of"]
