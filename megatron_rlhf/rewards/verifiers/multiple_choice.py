"""Multiple-choice verifier (GPQA/MMLU style): extract the chosen letter, compare with the key.

Ground truth: the correct letter (``"B"``), or ``{"answer": "B", "choices": 4}`` to restrict the
valid letters to the first ``choices`` (default A-J, as in MMLU-Pro).

Extraction, in order: boxed letters (``\\boxed{B}``, ``\\boxed{\\text{(B)}}``); statements such as
"the answer is (B)", "Answer: **B**", "correct option: B"; a response that is only a letter
("B", "(B)", "B."). Not credited (wrong answer, with the reason): different letters in different
boxes or answer statements, and one statement naming several ("A or B", "B/C", "A and D").
Linear-time regular expressions only.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

from megatron_rlhf.rewards.sample import RewardResult, RewardSample, Verdict

LETTERS = "ABCDEFGHIJ"
_LETTER = r"\(?\s*([A-J])\s*\)?"
_BOXED = re.compile(r"\\boxed\s*\{\s*(?:\\text(?:bf)?\s*\{\s*)?" + _LETTER + r"\s*\}?\s*\}")
_STATEMENT = re.compile(  # the phrase in any case, the letters upper case only
    r"(?i:(?:(?:correct|final|best) )?(?:answer|option|choice) ?(?:is|:|：|=)? ?(?:option |choice )?)\** ?"
    + _LETTER
    + r"\**((?: ?(?:,|/|(?i:\bor\b|\band\b)|&) ?\(? ?[A-J]\b ?\)?)*)"
)
_ONLY_LETTER = re.compile(r"\s*\**\s*" + _LETTER + r"\s*[.:]?\s*\**\s*")


@dataclass(frozen=True)
class MultipleChoiceConfig:
    default_choices: int = 10
    """Valid letters when the ground truth does not say: the first N of A-J (2..10)."""

    def __post_init__(self) -> None:
        if isinstance(self.default_choices, bool) or not isinstance(self.default_choices, int) or not 2 <= self.default_choices <= 10:
            raise ValueError(f"multiple_choice default_choices must be in 2..10, got {self.default_choices!r}")


def extract_choice(response: str) -> tuple[str | None, str | None]:
    """(letter, rejection): the chosen letter, or why none is credited."""
    response = " ".join(response.split())  # one space per gap: the patterns never backtrack far
    boxed = [match.group(1).upper() for match in _BOXED.finditer(response)]
    statements = list(_STATEMENT.finditer(response))
    stated = [match.group(1).upper() for match in statements]
    for found, where in ((boxed, "boxed answers"), (stated, "answer statements")):
        if len(set(found)) > 1:
            return None, f"answer spraying: {len(set(found))} different letters in {where}"
    if statements and statements[-1].group(2).strip():
        return None, f"answer spraying: several options in {statements[-1].group(0).strip()[:80]!r}"
    if boxed:
        return boxed[-1], None
    if stated:
        return stated[-1], None
    only = _ONLY_LETTER.fullmatch(response) if len(response) < 20 else None
    if only:
        return only.group(1).upper(), None
    return None, None


def parse_choice_ground_truth(ground_truth: Any, default_choices: int, where: str) -> tuple[str, str]:
    """(correct letter, valid letters); ValueError naming ``where`` on bad input."""
    choices = default_choices
    if isinstance(ground_truth, dict):
        unknown = set(ground_truth) - {"answer", "choices"}
        if unknown or "answer" not in ground_truth:
            raise ValueError(f"{where}: multiple-choice ground_truth takes 'answer' and optional 'choices', got {sorted(ground_truth)}")
        choices = ground_truth.get("choices", default_choices)
        ground_truth = ground_truth["answer"]
    if isinstance(choices, bool) or not isinstance(choices, int) or not 2 <= choices <= 10:
        raise ValueError(f"{where}: 'choices' must be an integer in 2..10, got {choices!r}")
    valid = LETTERS[:choices]
    if not isinstance(ground_truth, str) or ground_truth.strip().upper() not in valid:
        raise ValueError(f"{where}: multiple-choice answer must be one letter of {valid}, got {ground_truth!r}")
    return ground_truth.strip().upper(), valid


class MultipleChoiceVerifier:
    """:class:`~megatron_rlhf.rewards.interface.RewardSource` for ``domain: multiple_choice``."""

    name = "multiple_choice"

    def __init__(self, config: MultipleChoiceConfig) -> None:
        self.config = config

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        return [self.score_one(sample) for sample in samples]

    def score_one(self, sample: RewardSample) -> RewardResult:
        started = time.monotonic()
        result = self._score(sample)
        return RewardResult(result.reward, result.status, result.verdict, result.detail, time.monotonic() - started)

    def _score(self, sample: RewardSample) -> RewardResult:
        try:
            key, valid = parse_choice_ground_truth(
                sample.ground_truth, self.config.default_choices, f"sample {sample.sample_id!r}"
            )
        except ValueError as error:
            return RewardResult.infra_error(Verdict.INVALID_INPUT, str(error))
        letter, rejection = extract_choice(sample.response)
        if rejection is not None:
            return RewardResult.incorrect(Verdict.WRONG_ANSWER, rejection)
        if letter is None:
            return RewardResult.incorrect(Verdict.NO_ANSWER, "no option letter found")
        if letter not in valid:
            return RewardResult.incorrect(Verdict.WRONG_ANSWER, f"chose {letter}, not one of {valid}")
        if letter == key:
            return RewardResult.correct(f"chose {letter}")
        return RewardResult.incorrect(Verdict.WRONG_ANSWER, f"chose {letter}, key is {key}")

    def close(self) -> None:
        """Nothing to release: this verifier runs in-process and holds no sandbox or pool."""
