"""Labelled math responses for the reward-model studies: outcome labels (ORM) and step labels (PRM).

The synthetic math problems of :mod:`megatron_rlhf.data.synthetic_tasks` have worked solutions
of one arithmetic step per operation ("3 + 4 = 7.") and a final "The answer is 7.". A candidate
response here is that solution, one step per line; with probability ``1 - correct_rate`` one
computation step (chosen uniformly) is off by 1 or 2 and every later step carries the error
forward, as a model's slip would. Step labels: 1 before the first wrong step, 0 from it on; the
outcome label is 1 iff every step is right. The held-out candidates are graded by the real math
verifier in the studies, not by these labels.

Guarantees: deterministic in the ``random.Random`` passed in; a wrong candidate's final answer
differs from the ground truth. Not guaranteed:
that the candidates look like a given policy's samples (they measure the reward model, not a
policy).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

STEP = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)\.$")


@dataclass(frozen=True)
class MathProblem:
    prompt: str
    steps: tuple[str, ...]
    """Computation steps "a op b = c.", then "The answer is c."."""
    answer: str


@dataclass(frozen=True)
class Candidate:
    steps: tuple[str, ...]
    step_labels: tuple[float, ...]
    label: int

    @property
    def response(self) -> str:
        return "\n".join(self.steps)


def math_problems(count: int, operations: int, seed: int) -> list[MathProblem]:
    """``count`` math problems with distinct prompts and exactly ``operations`` steps each."""
    from megatron_rlhf.data.synthetic_tasks import MathDifficulty, generate_math_task, unique_tasks

    difficulty = MathDifficulty(operand_min=1, operand_max=9, min_operations=operations, max_operations=operations,
                                multiplication=False)
    tasks = unique_tasks(lambda rng: generate_math_task(rng, difficulty), lambda task: task.prompt, count,
                         random.Random(f"study-math:{seed}"), "math")
    problems = []
    for task in tasks:
        body, _, _ = task.solution.rpartition(" The answer is ")
        steps = tuple(part if part.endswith(".") else part + "." for part in body.split(". ") if part)
        problems.append(MathProblem(task.prompt, steps + (f"The answer is {task.answer}.",), task.answer))
    return problems


def _apply(left: int, operator: str, right: int) -> int:
    return left + right if operator == "+" else left - right if operator == "-" else left * right


def candidate(problem: MathProblem, correct_rate: float, rng: random.Random) -> Candidate:
    """One labelled candidate response (see the module docstring)."""
    computations = len(problem.steps) - 1
    if rng.random() < correct_rate:
        return Candidate(problem.steps, (1.0,) * len(problem.steps), 1)
    wrong_at = rng.randrange(computations)
    steps, labels, value = [], [], None
    for index, text in enumerate(problem.steps[:-1]):
        left, operator, right, _ = STEP.match(text).groups()
        left = int(left) if value is None else value
        value = _apply(left, operator, int(right))
        if index == wrong_at:
            value = max(value + rng.choice((-2, -1, 1, 2)), 0)
            if value == _apply(left, operator, int(right)):
                value += 1
        steps.append(f"{left} {operator} {right} = {value}.")
        labels.append(1.0 if index < wrong_at else 0.0)
    if str(value) == problem.answer:  # the error cancelled out: still a wrong path, keep the answer wrong
        value += 1
        steps[-1] = steps[-1].rsplit("= ", 1)[0] + f"= {value}."
    steps.append(f"The answer is {value}.")
    labels.append(0.0)
    return Candidate(tuple(steps), tuple(labels), 0)


def labelled_records(problems: list[MathProblem], per_prompt: int, correct_rate: float, seed: int,
                     with_steps: bool) -> list[dict[str, Any]]:
    """``per_prompt`` candidates per problem as reward-model training records: outcome-labelled
    ``{"prompt", "response", "label"}`` or, ``with_steps``, step-labelled ``{"prompt", "steps",
    "step_labels", "label"}`` (the formats ``train-rm`` reads)."""
    rng = random.Random(f"study-candidates:{seed}")
    records = []
    for problem in problems:
        for _ in range(per_prompt):
            drawn = candidate(problem, correct_rate, rng)
            if with_steps:
                records.append({"prompt": problem.prompt, "steps": list(drawn.steps),
                                "step_labels": list(drawn.step_labels), "label": drawn.label, "domain": "math"})
            else:
                records.append({"prompt": problem.prompt, "response": drawn.response, "label": drawn.label,
                                "domain": "math"})
    return records
