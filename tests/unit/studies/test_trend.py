"""The trend lines and verdicts of the scaling studies (pure functions, made-up numbers)."""

from __future__ import annotations

import math

import pytest

from megatron_rlhf.studies import trend


def test_fit_line_recovers_an_exact_line():
    slope, intercept = trend.fit_line([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0])
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(1.0)


def test_fit_line_needs_two_distinct_x():
    with pytest.raises(ValueError, match="distinct"):
        trend.fit_line([1, 1], [0.0, 1.0])


def test_standard_error_is_positive_even_at_zero_accuracy():
    assert trend.accuracy_standard_error(0.0, 10) > 0
    assert trend.accuracy_standard_error(0.5, 10_000) == pytest.approx(math.sqrt(0.25 / 10_000), rel=1e-3)


def test_a_clear_gain_that_grows_with_n_holds():
    verdict = trend.gap_grows_verdict("claim", better=[0.6, 0.8], worse=[0.4, 0.4], sizes=[4, 16], count=400)
    assert verdict.verdict == trend.HOLDS
    assert verdict.numbers["gap@16"] == pytest.approx(0.4) and verdict.numbers["gap_growth"] == pytest.approx(0.2)


def test_a_clear_gap_the_other_way_does_not_hold():
    verdict = trend.gap_grows_verdict("claim", better=[0.3, 0.3], worse=[0.6, 0.7], sizes=[4, 16], count=400)
    assert verdict.verdict == trend.DOES_NOT_HOLD


def test_a_gap_within_noise_is_inconclusive():
    verdict = trend.gap_grows_verdict("claim", better=[0.5, 0.625], worse=[0.375, 0.375], sizes=[4, 16], count=8)
    assert verdict.verdict == trend.INCONCLUSIVE


def test_all_zero_measurements_are_inconclusive_whatever_the_claim():
    assert trend.increases_verdict("c", [1, 2, 4], [0.0, 0.0, 0.0], 1000).verdict == trend.INCONCLUSIVE
    assert trend.plateau_verdict("c", [1, 2, 4, 8, 16], [0.0] * 5, 1000).verdict == trend.INCONCLUSIVE
    assert trend.ranking_verdict("c", ("a", 0.0), ("b", 0.0), 1000).verdict == trend.INCONCLUSIVE
    assert trend.no_difference_verdict("c", ("a", 0.0), ("b", 0.0), 1000).verdict == trend.INCONCLUSIVE


def test_increases_fits_the_slope_per_doubling():
    verdict = trend.increases_verdict("c", [1, 2, 4, 8], [0.2, 0.3, 0.4, 0.5], 1000)
    assert verdict.verdict == trend.HOLDS and verdict.numbers["slope"] == pytest.approx(0.1)
    assert trend.increases_verdict("c", [1, 2, 4, 8], [0.5, 0.4, 0.3, 0.2], 1000).verdict == trend.DOES_NOT_HOLD


def test_a_rise_then_flat_curve_is_a_plateau_and_a_straight_rise_is_not():
    plateau = trend.plateau_verdict("c", [1, 2, 4, 8, 16], [0.2, 0.4, 0.5, 0.51, 0.52], 2000)
    assert plateau.verdict == trend.HOLDS and plateau.numbers["late_slope"] < plateau.numbers["early_slope"]
    straight = trend.plateau_verdict("c", [1, 2, 4, 8, 16], [0.1, 0.2, 0.3, 0.4, 0.5], 2000)
    assert straight.verdict == trend.INCONCLUSIVE  # still gaining: no plateau seen
    falling = trend.plateau_verdict("c", [1, 2, 4, 8, 16], [0.5, 0.4, 0.3, 0.3, 0.3], 2000)
    assert falling.verdict == trend.DOES_NOT_HOLD


def test_a_plateau_needs_three_arms():
    verdict = trend.plateau_verdict("c", [1, 4], [0.1, 0.6], 2000)
    assert verdict.verdict == trend.INCONCLUSIVE and "needs >= 3 arms" in verdict.evidence


def test_no_difference_holds_only_when_measured_precisely():
    assert trend.no_difference_verdict("c", ("a", 0.50), ("b", 0.51), 2000).verdict == trend.HOLDS
    assert trend.no_difference_verdict("c", ("a", 0.50), ("b", 0.51), 10).verdict == trend.INCONCLUSIVE
    assert trend.no_difference_verdict("c", ("a", 0.30), ("b", 0.60), 2000).verdict == trend.DOES_NOT_HOLD


def test_curve_ranking_uses_the_step_to_step_spread_of_the_last_half():
    higher = ("grpo", [0.0, 0.0, 1.0, 1.1, 0.9, 1.0])
    lower = ("ppo", [0.0, 0.0, 0.1, 0.2, 0.1, 0.15])
    verdict = trend.curve_ranking_verdict("c", higher, lower)
    assert verdict.verdict == trend.HOLDS and verdict.numbers["difference"] == pytest.approx(1.0 - 0.15)
    assert trend.curve_ranking_verdict("c", lower, higher).verdict == trend.DOES_NOT_HOLD
    assert trend.curve_ranking_verdict("c", ("a", [1.0]), ("b", [0.0])).verdict == trend.INCONCLUSIVE
