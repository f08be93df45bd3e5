"""The one interface every reward source implements, and the guard that stops a run on scorer failures.

:class:`RewardSource` is what the router, the RL step and ``megatron-rlhf score`` call: rule-based
verifiers (math, code, multiple choice, instruction following) implement it today; the learned
sources (Bradley-Terry RM, PRM, GenRM) implement the same method when they exist, returning
``step_rewards`` where they have them.

Guarantees of a conforming source: ``score`` returns exactly one :class:`RewardResult` per input
sample, in order; it does not raise for anything a model can write (empty, huge, invalid UTF-8,
deeply nested responses get a status); a failure of the scorer itself is an INFRA_ERROR result with
``reward=None``, never a reward of 0.

:class:`InfraErrorGuard` turns INFRA_ERROR results into an update mask and raises
:class:`InfraErrorRateExceeded` once the rate of scorer failures over the recent window is above
the configured maximum, so that a broken sandbox or a dead reward server stops the run instead of
quietly training on a shrinking batch.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus


@runtime_checkable
class RewardSource(Protocol):
    """Scores a batch of samples; one result per sample, in order, never raising on model output."""

    name: str

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]: ...

    def close(self) -> None:
        """Release processes and threads (idempotent)."""
        ...


class InfraErrorRateExceeded(RuntimeError):
    """Too many samples could not be scored; the run must stop rather than train on what is left.

    ``results`` holds the batch's results when the router raised it (for reporting)."""

    results: list[RewardResult] | None = None


@dataclass(frozen=True)
class InfraErrorPolicy:
    max_rate: float = 0.05
    """Largest tolerated fraction of INFRA_ERROR samples over the window, in [0, 1]."""
    window: int = 1000
    """How many of the most recent samples the rate is measured over. >= 1."""
    min_samples: int = 20
    """The rate is not judged before this many samples were seen (one early failure is not a
    rate). >= 1."""

    def __post_init__(self) -> None:
        _check_fraction("max_rate", self.max_rate)
        _check_positive_int("window", self.window)
        _check_positive_int("min_samples", self.min_samples)


class InfraErrorGuard:
    """Counts scorer failures and stops the run above :attr:`InfraErrorPolicy.max_rate`."""

    def __init__(self, policy: InfraErrorPolicy) -> None:
        self.policy = policy
        self._recent: collections.deque[bool] = collections.deque(maxlen=policy.window)
        self.total_samples = 0
        self.total_infra_errors = 0

    def observe(self, results: Sequence[RewardResult]) -> list[bool]:
        """Record a batch; return the update mask (False for INFRA_ERROR samples).

        Raises :class:`InfraErrorRateExceeded` when the windowed rate is above the maximum.
        """
        mask = [result.status is not RewardStatus.INFRA_ERROR for result in results]
        for included in mask:
            self._recent.append(not included)
        self.total_samples += len(mask)
        self.total_infra_errors += mask.count(False)
        self._check()
        return mask

    def state_dict(self) -> dict:
        """The window and the totals as plain data (for checkpoints)."""
        return {"recent": [bool(error) for error in self._recent], "total_samples": self.total_samples,
                "total_infra_errors": self.total_infra_errors}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (the window keeps this guard's ``policy.window``)."""
        self._recent = collections.deque((bool(error) for error in state["recent"]), maxlen=self.policy.window)
        self.total_samples = int(state["total_samples"])
        self.total_infra_errors = int(state["total_infra_errors"])

    @property
    def recent_rate(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else 0.0

    def _check(self) -> None:
        errors = sum(self._recent)
        seen = len(self._recent)
        if seen >= self.policy.min_samples and errors / seen > self.policy.max_rate:
            raise InfraErrorRateExceeded(
                f"{errors} of the last {seen} samples could not be scored (rate "
                f"{errors / seen:.3f} > max_rate {self.policy.max_rate}); stopping instead of "
                f"training on the rest. Total so far: {self.total_infra_errors} of "
                f"{self.total_samples}. Check the sandbox / reward servers, or raise "
                "infra_errors.max_rate in the reward config."
            )


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")

