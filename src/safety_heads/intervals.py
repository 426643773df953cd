"""How sure a rate is: the 95% Wilson score interval of k successes in n trials.

Why: an ASR of 16 prompts moves in steps of 6.25 points, and two ASRs a few points apart may be the same rate. Every
ASR in eval.json and the report carries this interval beside n. Wilson rather than the normal approximation: it stays
inside [0, 1] and keeps a sensible width at k = 0 or k = n, where the normal interval collapses to a point.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` of `n` (n >= 1)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At k = 0 (k = n) the bound is exactly 0 (1); the subtraction leaves a rounding error of ~1e-17 instead.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


__all__ = ["Z95", "wilson_interval"]
