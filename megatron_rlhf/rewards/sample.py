"""The values every reward source takes and returns: samples in, one result per sample out.

A :class:`RewardSample` is one (prompt, response) pair with its domain tag and the domain's ground
truth. A :class:`RewardResult` always carries a :class:`RewardStatus`:

- ``SCORED``: the reward is a real number to train on (a verifier whose answer checked out, or a
  learned reward model's score);
- ``FAILED_VERIFICATION``: the response was checked and is wrong (reward 0.0, a real reward that
  is trained on);
- ``INFRA_ERROR``: the scorer itself failed (sandbox crash, the scorer's own time limit, an
  unreadable ground truth). ``reward`` is ``None``: such a sample is never silently a reward of 0;
  it is excluded from the update and counted by :class:`~megatron_rlhf.rewards.interface.InfraErrorGuard`.

:class:`Verdict` says why, in the words of a judge (OK, wrong answer, runtime error, time limit,
memory limit, output limit, ...).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RewardStatus(str, enum.Enum):
    SCORED = "scored"
    FAILED_VERIFICATION = "failed_verification"
    INFRA_ERROR = "infra_error"


class Verdict(str, enum.Enum):
    OK = "ok"
    """Checked and correct (or a learned score was produced)."""
    WRONG_ANSWER = "wrong_answer"
    """Checked and incorrect: a different answer, failing tests, answer spraying, a broken constraint."""
    NO_ANSWER = "no_answer"
    """No final answer (or no code) could be found in the response."""
    RUNTIME_ERROR = "runtime_error"
    """The candidate program exited with an error (exception, non-zero exit, killed by a signal)."""
    TIME_LIMIT = "time_limit"
    """The candidate program ran past its wall-clock or CPU-time limit."""
    MEMORY_LIMIT = "memory_limit"
    """The candidate program ran out of its memory limit."""
    OUTPUT_LIMIT = "output_limit"
    """The candidate program wrote more than its output limit."""
    INVALID_INPUT = "invalid_input"
    """The sample's ground truth (or metadata) is unusable: a data error, reported as INFRA_ERROR."""
    SCORER_TIME_LIMIT = "scorer_time_limit"
    """The scorer itself ran past its own hard time limit (INFRA_ERROR)."""
    SCORER_ERROR = "scorer_error"
    """The scorer itself crashed or could not run (INFRA_ERROR)."""
    UNPARSEABLE_JUDGEMENT = "unparseable_judgement"
    """A generative judge (GenRM) wrote no verdict that could be read (INFRA_ERROR)."""


@dataclass(frozen=True)
class RewardSample:
    """One response to score."""

    sample_id: str
    """Identifier carried into results and logs (the ``id`` of a JSONL line)."""
    domain: str
    """Routing tag: ``math``, ``code``, ``multiple_choice``, ``instruction_following``, ``general_chat``, ..."""
    prompt: str
    response: str
    """The model's response. May be empty, huge, or hold lone surrogates (invalid UTF-8 decoded
    with ``surrogateescape``); every verifier answers such input with a status."""
    ground_truth: Any = None
    """Domain-specific reference: a reference answer string (math, multiple choice), a code test
    specification (code), a constraint list (instruction following); ``None`` for learned RMs."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form extras (source data set, line number, ...); verifiers only read documented keys."""


@dataclass(frozen=True)
class RewardResult:
    """What a reward source says about one sample."""

    reward: float | None
    """The scalar reward; ``None`` exactly when ``status`` is INFRA_ERROR."""
    status: RewardStatus
    verdict: Verdict
    detail: str = ""
    """Human-readable reason (first failing test, extracted answer, scorer error), at most a few lines."""
    seconds: float = 0.0
    """Wall-clock seconds spent scoring this sample."""
    step_rewards: tuple[float, ...] | None = None
    """Per-step rewards for sources that have them (a PRM); ``None`` for outcome-only sources."""
    raw_score: float | None = None
    """Router results: the domain's weighted sum of its sources' rewards before normalisation and
    clipping (what a user reads as the score; ``reward`` is what training uses). None elsewhere,
    and for INFRA_ERROR results."""
    source_rewards: tuple[tuple[str, float], ...] | None = None
    """Router results: ``(source name, its raw reward)`` for each source of the domain's route,
    in route order (what each source contributed). None elsewhere, and for INFRA_ERROR results."""

    def __post_init__(self) -> None:
        if (self.reward is None) != (self.status is RewardStatus.INFRA_ERROR):
            raise ValueError(
                f"reward must be None exactly for INFRA_ERROR results, got reward={self.reward!r} "
                f"with status {self.status.value}"
            )

    @property
    def passed(self) -> bool:
        return self.status is RewardStatus.SCORED and self.verdict is Verdict.OK

    @staticmethod
    def correct(detail: str = "", seconds: float = 0.0) -> "RewardResult":
        return RewardResult(1.0, RewardStatus.SCORED, Verdict.OK, detail, seconds)

    @staticmethod
    def incorrect(verdict: Verdict, detail: str = "", seconds: float = 0.0) -> "RewardResult":
        return RewardResult(0.0, RewardStatus.FAILED_VERIFICATION, verdict, detail, seconds)

    @staticmethod
    def infra_error(verdict: Verdict, detail: str, seconds: float = 0.0) -> "RewardResult":
        return RewardResult(None, RewardStatus.INFRA_ERROR, verdict, detail, seconds)
