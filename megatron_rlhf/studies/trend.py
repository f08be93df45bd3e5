"""Trend lines and verdicts: pure functions from a study's measured numbers to what they say about
the paper's claim.

Every measured accuracy here is a mean of Bernoulli outcomes over ``count`` prompts (or samples),
so its noise is binomial. A difference counts only when it exceeds ``Z`` = 2 combined standard
errors; the standard error of an accuracy ``p`` over ``n`` uses the Laplace estimate ``(k + 1) /
(n + 2)`` so that an all-0 or all-1 measurement still has a non-zero error (a difference between
two all-0 arms is never significant). Verdicts:

- ``holds``: every part of the claim is measured beyond noise, in the claimed direction;
- ``does not hold``: a part of the claim is measured beyond noise in the opposite direction;
- ``inconclusive``: otherwise (differences within noise, or every value 0).

Not guaranteed: a significance test in the strict sense (no correction for the several
comparisons a study makes; arms that share evaluation prompts are treated as independent, which
overstates the noise of their difference).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

Z = 2.0
"""Standard errors a difference must exceed to count."""
PRECISE = 0.1
"""A "no difference" claim holds only when the noise band (``Z`` errors) is at most this wide."""
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Verdict:
    claim: str
    """The paper's claim, in words."""
    verdict: str
    """holds | does not hold | inconclusive."""
    evidence: str
    """The numbers behind the verdict, in words."""
    numbers: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def accuracy_standard_error(accuracy: float, count: int) -> float:
    """Binomial standard error of an accuracy over ``count`` outcomes (Laplace-smoothed)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    smoothed = (accuracy * count + 1) / (count + 2)
    return math.sqrt(smoothed * (1 - smoothed) / count)


def difference_error(first: tuple[float, int], second: tuple[float, int]) -> float:
    """Standard error of ``first - second``, each an (accuracy, count)."""
    return math.hypot(accuracy_standard_error(*first), accuracy_standard_error(*second))


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of ``ys`` on ``xs`` (at least two distinct xs)."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"a line needs >= 2 distinct x values and one y per x, got xs={list(xs)} ys={list(ys)}")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


def signed(difference: float, error: float) -> int:
    """+1 / -1 when ``difference`` exceeds ``Z`` errors in that direction, else 0."""
    if difference > Z * error:
        return 1
    if difference < -Z * error:
        return -1
    return 0


def _all_zero(values: Sequence[float]) -> bool:
    return all(abs(value) < 1e-12 for value in values)


def gap_grows_verdict(claim: str, better: Sequence[float], worse: Sequence[float], sizes: Sequence[int],
                      count: int) -> Verdict:
    """Claim: ``better`` beats ``worse`` at every N, and the gap grows from the first N to the last.

    ``better``/``worse``: accuracy per N in ``sizes``, each over ``count`` prompts.
    """
    gaps = [b - w for b, w in zip(better, worse, strict=True)]
    errors = [difference_error((b, count), (w, count)) for b, w in zip(better, worse)]
    numbers = {f"gap@{n}": gap for n, gap in zip(sizes, gaps)} | {f"error@{n}": e for n, e in zip(sizes, errors)}
    evidence = ", ".join(f"gap at N={n}: {gap:+.3f} (+/- {Z * e:.3f})" for n, gap, e in zip(sizes, gaps, errors))
    if _all_zero([*better, *worse]):
        return Verdict(claim, INCONCLUSIVE, f"every accuracy is 0 ({evidence})", numbers)
    signs = [signed(gap, error) for gap, error in zip(gaps, errors)]
    growth = gaps[-1] - gaps[0]
    numbers["gap_growth"] = growth
    evidence += f"; growth of the gap from N={sizes[0]} to N={sizes[-1]}: {growth:+.3f}"
    if any(sign < 0 for sign in signs):
        return Verdict(claim, DOES_NOT_HOLD, evidence, numbers)
    if signs[-1] > 0 and growth > 0:
        return Verdict(claim, HOLDS, evidence, numbers)
    return Verdict(claim, INCONCLUSIVE, evidence, numbers)


def increases_verdict(claim: str, xs: Sequence[float], ys: Sequence[float], count: int,
                      log2_x: bool = True) -> Verdict:
    """Claim: ``ys`` (accuracies over ``count`` each) rise with ``xs``: the slope of the line fitted
    on log2(x) (or x) and the last-minus-first difference, which must exceed its noise."""
    axis = [math.log2(x) for x in xs] if log2_x else list(xs)
    slope, intercept = fit_line(axis, ys)
    total = ys[-1] - ys[0]
    error = difference_error((ys[-1], count), (ys[0], count))
    numbers = {"slope": slope, "intercept": intercept, "last_minus_first": total, "error": error}
    unit = "per doubling" if log2_x else "per unit"
    evidence = (f"trend line: {slope:+.4f} {unit} (intercept {intercept:.3f}); last minus first: {total:+.3f} "
                f"(+/- {Z * error:.3f})")
    if _all_zero(ys):
        return Verdict(claim, INCONCLUSIVE, f"every value is 0 ({evidence})", numbers)
    sign = signed(total, error)
    verdict = HOLDS if sign > 0 and slope > 0 else DOES_NOT_HOLD if sign < 0 else INCONCLUSIVE
    return Verdict(claim, verdict, evidence, numbers)


def plateau_verdict(claim: str, xs: Sequence[float], ys: Sequence[float], count: int) -> Verdict:
    """Claim: gains at first, then a plateau. The first half of the arms (on log2 x) must gain beyond
    noise, and the second half must gain less per doubling than the first."""
    if len(xs) < 3:
        verdict = increases_verdict(claim, xs, ys, count)
        return Verdict(claim, verdict.verdict if verdict.verdict != HOLDS else INCONCLUSIVE,
                       verdict.evidence + f"; a plateau needs >= 3 arms, got {len(xs)}", verdict.numbers)
    middle = len(xs) // 2
    axis = [math.log2(x) for x in xs]
    early_slope, _ = fit_line(axis[: middle + 1], ys[: middle + 1])
    late_slope, _ = fit_line(axis[middle:], ys[middle:])
    early_gain = ys[middle] - ys[0]
    error = difference_error((ys[middle], count), (ys[0], count))
    numbers = {"early_slope": early_slope, "late_slope": late_slope, "early_gain": early_gain, "error": error}
    evidence = (f"slope per doubling up to n={xs[middle]}: {early_slope:+.4f}, after: {late_slope:+.4f}; "
                f"gain n={xs[0]} -> n={xs[middle]}: {early_gain:+.3f} (+/- {Z * error:.3f})")
    if _all_zero(ys):
        return Verdict(claim, INCONCLUSIVE, f"every value is 0 ({evidence})", numbers)
    sign = signed(early_gain, error)
    if sign > 0 and late_slope < early_slope:
        return Verdict(claim, HOLDS, evidence, numbers)
    if sign < 0:
        return Verdict(claim, DOES_NOT_HOLD, evidence, numbers)
    return Verdict(claim, INCONCLUSIVE, evidence, numbers)


def ranking_verdict(claim: str, better: tuple[str, float], worse: tuple[str, float], count: int) -> Verdict:
    """Claim: arm ``better`` scores above arm ``worse`` (each (name, accuracy over ``count``))."""
    difference = better[1] - worse[1]
    error = difference_error((better[1], count), (worse[1], count))
    numbers = {better[0]: better[1], worse[0]: worse[1], "difference": difference, "error": error}
    evidence = f"{better[0]} {better[1]:.3f} vs {worse[0]} {worse[1]:.3f}: {difference:+.3f} (+/- {Z * error:.3f})"
    if _all_zero([better[1], worse[1]]):
        return Verdict(claim, INCONCLUSIVE, f"both are 0 ({evidence})", numbers)
    sign = signed(difference, error)
    return Verdict(claim, HOLDS if sign > 0 else DOES_NOT_HOLD if sign < 0 else INCONCLUSIVE, evidence, numbers)


def no_difference_verdict(claim: str, first: tuple[str, float], second: tuple[str, float], count: int) -> Verdict:
    """Claim: the two arms are about equal (e.g. "PRM gives no clear gain over ORM"): holds when the
    difference is within noise and the noise itself is small (``Z`` errors <= ``PRECISE``), does
    not hold when the difference exceeds the noise; inconclusive otherwise (all 0, or too noisy to
    tell "equal" from "not measured")."""
    difference = first[1] - second[1]
    error = difference_error((first[1], count), (second[1], count))
    numbers = {first[0]: first[1], second[0]: second[1], "difference": difference, "error": error}
    evidence = f"{first[0]} {first[1]:.3f} vs {second[0]} {second[1]:.3f}: {difference:+.3f} (+/- {Z * error:.3f})"
    if _all_zero([first[1], second[1]]):
        return Verdict(claim, INCONCLUSIVE, f"both are 0 ({evidence})", numbers)
    if signed(difference, error) != 0:
        return Verdict(claim, DOES_NOT_HOLD, evidence, numbers)
    return Verdict(claim, HOLDS if Z * error <= PRECISE else INCONCLUSIVE, evidence, numbers)


def curve_ranking_verdict(claim: str, higher: tuple[str, Sequence[float]],
                          lower: tuple[str, Sequence[float]]) -> Verdict:
    """Claim: curve ``higher`` runs above curve ``lower`` (e.g. KL per RL step). Compared over the
    last half of the steps: the difference of the means against the standard error from the
    step-to-step spread of each (a single step has no spread: inconclusive)."""
    def tail(values: Sequence[float]) -> list[float]:
        finite = [value for value in values if math.isfinite(value)]
        return finite[len(finite) // 2 :]

    first, second = tail(higher[1]), tail(lower[1])
    numbers: dict[str, float] = {}
    if len(first) < 2 or len(second) < 2:
        return Verdict(claim, INCONCLUSIVE, f"too few steps to estimate the noise ({len(first)} and {len(second)} "
                       f"in the last half of {higher[0]} and {lower[0]})", numbers)

    def mean_and_error(values: list[float]) -> tuple[float, float]:
        mean = sum(values) / len(values)
        variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
        return mean, math.sqrt(variance / len(values))

    (mean_high, error_high), (mean_low, error_low) = mean_and_error(first), mean_and_error(second)
    difference, error = mean_high - mean_low, math.hypot(error_high, error_low)
    numbers = {higher[0]: mean_high, lower[0]: mean_low, "difference": difference, "error": error}
    evidence = (f"last-half mean {higher[0]} {mean_high:.4g} vs {lower[0]} {mean_low:.4g}: {difference:+.4g} "
                f"(+/- {Z * error:.4g})")
    if _all_zero([*first, *second]):
        return Verdict(claim, INCONCLUSIVE, f"every value is 0 ({evidence})", numbers)
    sign = signed(difference, error)
    return Verdict(claim, HOLDS if sign > 0 else DOES_NOT_HOLD if sign < 0 else INCONCLUSIVE, evidence, numbers)
