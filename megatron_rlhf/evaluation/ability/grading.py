"""Grading answers with the project's verifiers, and per-task accuracy.

Graders: ``math`` (:class:`MathVerifier`, equivalence by math-verify in the sandbox), ``code``
(:class:`CodeVerifier`, tests in the sandbox, ``sandbox.max_concurrency`` executions in
parallel), ``multiple_choice`` and ``instruction_following`` (in-process string checks). Each is
built from its own config dataclass; a suite's ``graders:`` section sets its fields.

An answer passes when its verifier scored it correct (status SCORED, verdict OK). Infrastructure
errors (a sandbox that could not run) are counted and left out of the accuracy, never scored as
wrong; items the engine dropped (prompt too long) are counted and left out too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from megatron_rlhf.evaluation.ability.items import EvalItem


def _grader_kinds() -> dict[str, tuple[type, type]]:
    from megatron_rlhf.rewards.verifiers.code_verifier import CodeVerifier, CodeVerifierConfig
    from megatron_rlhf.rewards.verifiers.instruction_following import (
        InstructionFollowingConfig,
        InstructionFollowingVerifier,
    )
    from megatron_rlhf.rewards.verifiers.math_verifier import MathVerifier, MathVerifierConfig
    from megatron_rlhf.rewards.verifiers.multiple_choice import MultipleChoiceConfig, MultipleChoiceVerifier

    return {
        "math": (MathVerifierConfig, MathVerifier),
        "code": (CodeVerifierConfig, CodeVerifier),
        "multiple_choice": (MultipleChoiceConfig, MultipleChoiceVerifier),
        "instruction_following": (InstructionFollowingConfig, InstructionFollowingVerifier),
    }


def grader_config(grader: str, settings: Mapping[str, Any], where: str) -> Any:
    """The config dataclass of ``grader`` from suite settings; ValueError naming ``where``."""
    from megatron_rlhf.rewards.reward_config import dataclass_from_mapping

    config_class, _ = _grader_kinds()[grader]
    return dataclass_from_mapping(config_class, dict(settings), where)


@contextlib.contextmanager
def open_graders(names: set[str], settings: Mapping[str, Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """The verifiers named in ``names`` (sandboxes started once), closed on exit."""
    kinds = _grader_kinds()
    graders: dict[str, Any] = {}
    try:
        for name in sorted(names):
            graders[name] = kinds[name][1](grader_config(name, settings.get(name, {}), f"graders.{name}"))
        yield graders
    finally:
        for grader in graders.values():
            grader.close()


@dataclass
class PolicyAnswers:
    """One policy's answers, by index into the evaluated item list."""

    greedy: dict[int, str] = field(default_factory=dict)
    """Item index -> the greedy answer (absent: the engine dropped the prompt, or no greedy run)."""
    sampled: dict[int, list[str]] = field(default_factory=dict)
    """Item index -> the sampled answers."""


@dataclass(frozen=True)
class GradedAnswer:
    item: int
    """Index into the evaluated item list."""
    kind: str
    """greedy | sampled."""
    response: str
    result: Any
    """The verifier's RewardResult."""

    @property
    def passed(self) -> bool:
        return self.result.passed


@dataclass(frozen=True)
class TaskScores:
    greedy_accuracy: float | None
    """Fraction of greedy answers that passed (None: no greedy answer graded)."""
    sampled_accuracy: float | None
    """Fraction of sampled answers that passed: an estimate of pass@1 at the sampling temperature."""
    items: int
    """Items of the task evaluated."""
    dropped: int
    """Items the engine did not answer (prompt longer than the engine holds)."""
    infra_errors: int
    """Answers the verifier could not grade (left out of the accuracies)."""

    def score(self, metric: str) -> float | None:
        return getattr(self, metric)


def grade_answers(items: Sequence[EvalItem], answers: PolicyAnswers, graders: Mapping[str, Any],
                  chat_template: bool = True) -> list[GradedAnswer]:
    """Grade every answer with its item's verifier (one ``score`` call per grader)."""
    from megatron_rlhf.rewards.sample import RewardSample

    pending: list[tuple[int, str, str]] = [(index, "greedy", text) for index, text in sorted(answers.greedy.items())]
    pending += [(index, "sampled", text) for index, texts in sorted(answers.sampled.items()) for text in texts]
    by_grader: dict[str, list[int]] = {}
    for position, (index, _, _) in enumerate(pending):
        by_grader.setdefault(items[index].grader, []).append(position)
    results: list[Any] = [None] * len(pending)
    for grader, positions in by_grader.items():
        samples = []
        for position in positions:
            index, kind, text = pending[position]
            item = items[index]
            samples.append(RewardSample(sample_id=f"{item.id}:{kind}:{position}", domain=grader,
                                        prompt=item.text(chat_template), response=text, ground_truth=item.ground_truth))
        for position, result in zip(positions, graders[grader].score(samples)):
            results[position] = result
    return [GradedAnswer(index, kind, text, result) for (index, kind, text), result in zip(pending, results)]


def task_scores(items: Sequence[EvalItem], graded: Sequence[GradedAnswer]) -> dict[str, TaskScores]:
    """Per-task accuracies of ``graded`` answers to ``items``."""
    tasks = list(dict.fromkeys(item.task for item in items))
    scores = {}
    for task in tasks:
        indices = {index for index, item in enumerate(items) if item.task == task}
        mine = [answer for answer in graded if answer.item in indices]
        scores[task] = TaskScores(
            greedy_accuracy=_accuracy([answer for answer in mine if answer.kind == "greedy"]),
            sampled_accuracy=_accuracy([answer for answer in mine if answer.kind == "sampled"]),
            items=len(indices),
            dropped=len(indices - {answer.item for answer in mine}),
            infra_errors=sum(answer.result.reward is None for answer in mine),
        )
    return scores


def _accuracy(answers: Sequence[GradedAnswer]) -> float | None:
    graded = [answer for answer in answers if answer.result.reward is not None]
    return sum(answer.passed for answer in graded) / len(graded) if graded else None
