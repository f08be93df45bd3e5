"""Exact running moments (count, mean, sum of squared deviations) of a stream of numbers.

One class for every running normaliser: per-domain reward normalisation of the RL step
(:mod:`megatron_rlhf.algorithms.domain_normalization`) and the reward router's ``running_zscore``
(:mod:`megatron_rlhf.rewards.router`). Pure Python floats (float64), no torch, immutable: an
update returns a new object, so a caller holds and checkpoints its state (``to_list`` /
``from_list`` round-trip exactly). Merging uses Chan, Golub & LeVeque's parallel update, so the
moments do not depend on how the stream was split into batches beyond float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RunningMoments:
    """Moments of every reward of one domain seen so far."""

    count: int = 0
    """Number of rewards seen. >= 0."""
    mean: float = 0.0
    """Their mean (0 when count is 0)."""
    sum_squared_deviations: float = 0.0
    """sum_i (r_i - mean)^2 (Welford's M2). >= 0."""

    @property
    def std(self) -> float:
        """Unbiased std; 0 for fewer than two rewards."""
        if self.count < 2:
            return 0.0
        return math.sqrt(self.sum_squared_deviations / (self.count - 1))

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Moments of the union of both sets of rewards (Chan, Golub & LeVeque 1979)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / total
        squares = (
            self.sum_squared_deviations
            + other.sum_squared_deviations
            + delta * delta * self.count * other.count / total
        )
        return RunningMoments(total, mean, squares)

    @classmethod
    def of(cls, values: Sequence[float]) -> RunningMoments:
        """Moments of ``values`` (float64, two-pass)."""
        values = [float(value) for value in values]
        if not values:
            return cls()
        mean = math.fsum(values) / len(values)
        return cls(len(values), mean, math.fsum((value - mean) ** 2 for value in values))

    def added(self, values: Sequence[float]) -> RunningMoments:
        """Moments of everything seen so far plus ``values``."""
        return self.merge(RunningMoments.of(values))

    @property
    def population_std(self) -> float:
        """Population (n) std; 0 when empty."""
        return math.sqrt(self.sum_squared_deviations / self.count) if self.count else 0.0

    def to_list(self) -> list[float]:
        """Plain-data form for checkpoints: ``[count, mean, M2]`` (exact floats)."""
        return [float(self.count), self.mean, self.sum_squared_deviations]

    @classmethod
    def from_list(cls, data: Sequence[float]) -> RunningMoments:
        """Inverse of :meth:`to_list`."""
        return cls(int(data[0]), float(data[1]), float(data[2]))
