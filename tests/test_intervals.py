"""The 95% Wilson interval every ASR carries, against published values and against the interval's definition."""

import math

import pytest

from safety_heads.intervals import Z95, wilson_interval

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics in Medicine 17:857-872,
# Table II, method 3 (the score interval without continuity correction), to four places; scipy 1.17's
# binomtest(k, n).proportion_ci(method="wilson") gives the same four places.
NEWCOMBE = [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)]


@pytest.mark.parametrize("k,n,low,high", NEWCOMBE)
def test_matches_published_values(k, n, low, high):
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("n", [1, 16, 150])
def test_all_or_nothing_has_a_closed_form(n):
    """At k = 0 the upper bound is z^2 / (n + z^2), at k = n the lower one is n / (n + z^2)."""
    assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0  # exactly: the rate itself is inside
    assert wilson_interval(0, n) == pytest.approx((0.0, Z95 ** 2 / (n + Z95 ** 2)), abs=1e-12)
    assert wilson_interval(n, n) == pytest.approx((n / (n + Z95 ** 2), 1.0), abs=1e-12)


@pytest.mark.parametrize("k,n", [(3, 16), (8, 16), (37, 150)])
def test_bounds_are_the_rates_the_score_test_does_not_reject(k, n):
    """Each bound x solves (k/n - x)^2 = z^2 x (1 - x) / n: the rates a two-sided 5% score test just accepts."""
    for x in wilson_interval(k, n):
        assert (k / n - x) ** 2 == pytest.approx(Z95 ** 2 * x * (1 - x) / n, rel=1e-9)


def test_sixteen_prompts_are_a_wide_interval():
    """Why the report shows it: 3 of 16 (18.8%) is compatible with anything from about 7% to 43%."""
    low, high = wilson_interval(3, 16)
    assert 0.06 < low < 0.07 and 0.43 < high < 0.44 and math.isclose(Z95, 1.959964, rel_tol=1e-6)


@pytest.mark.parametrize("k,n", [(1, 0), (-1, 4), (5, 4)])
def test_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)
