"""Multiple-choice letter extraction and the instruction-following constraint kinds."""

from __future__ import annotations

import pytest

from megatron_rlhf.rewards.sample import RewardSample, RewardStatus, Verdict
from megatron_rlhf.rewards.verifiers.instruction_following import (
    CONSTRAINTS,
    InstructionFollowingConfig,
    InstructionFollowingVerifier,
)
from megatron_rlhf.rewards.verifiers.multiple_choice import MultipleChoiceConfig, MultipleChoiceVerifier


@pytest.mark.parametrize("response, verdict", [
    ("The answer is (B).", Verdict.OK),
    ("Let me think... Answer: **B**", Verdict.OK),
    ("\\boxed{B}", Verdict.OK),
    ("\\boxed{\\text{(B)}}", Verdict.OK),
    ("B", Verdict.OK),
    ("(B)", Verdict.OK),
    ("The correct option is C", Verdict.WRONG_ANSWER),
    ("The answer is A or B", Verdict.WRONG_ANSWER),
    ("Answer: B/C", Verdict.WRONG_ANSWER),
    ("Answer: A. On second thought, answer: B", Verdict.WRONG_ANSWER),
    ("the answer is a mystery", Verdict.NO_ANSWER),
    ("Answer: E", Verdict.WRONG_ANSWER),  # not one of the 4 choices
])
def test_multiple_choice(response, verdict) -> None:
    verifier = MultipleChoiceVerifier(MultipleChoiceConfig())
    (result,) = verifier.score([RewardSample("q", "multiple_choice", "", response, {"answer": "B", "choices": 4})])
    assert result.verdict is verdict, result.detail


def test_multiple_choice_bad_key_is_an_infra_error() -> None:
    verifier = MultipleChoiceVerifier(MultipleChoiceConfig())
    (result,) = verifier.score([RewardSample("q9", "multiple_choice", "", "B", "Z")])
    assert result.status is RewardStatus.INFRA_ERROR and "q9" in result.detail


# (constraint, a response that meets it, one that does not)
CASES = [
    ({"type": "word_count", "min": 3, "max": 5}, "one two three four", "one two"),
    ({"type": "sentence_count", "max": 2}, "One. Two!", "One. Two. Three."),
    ({"type": "paragraph_count", "count": 2}, "First.\n\nSecond.", "Only one."),
    ({"type": "include_keywords", "keywords": ["reward", "model"]}, "A reward model.", "A model."),
    ({"type": "forbidden_keywords", "keywords": ["sorry"]}, "Sure.", "Sorry, no."),
    ({"type": "keyword_frequency", "keyword": "cat", "min": 2}, "cat and cat", "cat and dog"),
    ({"type": "letter_frequency", "letter": "z", "max": 1}, "zebra", "zigzag"),
    ({"type": "json_format"}, '```json\n{"a": [1, 2]}\n```', "{a: 1}"),
    ({"type": "lowercase"}, "all lower here", "Not lower"),
    ({"type": "uppercase"}, "ALL UPPER", "Not Upper"),
    ({"type": "bullet_count", "count": 2}, "* one\n* two", "* one\n* two\n- three"),
    ({"type": "starts_with", "prefix": "Dear"}, "Dear team,", "Hello team,"),
    ({"type": "ends_with", "suffix": "Is there anything else?"}, "Done. Is there anything else?\n", "Done."),
    ({"type": "no_commas"}, "No commas here", "Yes, commas"),
    ({"type": "title"}, "<<My Title>>\ntext", "My Title\ntext"),
    ({"type": "placeholder_count", "min": 2}, "Send to [name] at [address]", "Send to [name]"),
    ({"type": "section_count", "marker": "Section", "count": 2}, "Section 1\na\nSection 2\nb", "Section 1\na"),
    ({"type": "quoted"}, '"quoted answer"', "unquoted"),
    ({"type": "highlight_count", "min": 1}, "a *key* point", "no highlight"),
    ({"type": "postscript", "marker": "P.P.S"}, "Hi.\n\np. p. s. bye", "Hi. PS bye"),
    ({"type": "repeat_prompt", "prompt": "Say hi."}, "say hi. Hi!", "Hi! Say hi."),
    ({"type": "two_responses"}, "Yes.\n******\nNo.", "Yes.\n******\nYes."),
    ({"type": "constrained_response"}, "Well. My answer is maybe.", "My answer is perhaps."),
    ({"type": "capital_word_count", "min": 2}, "THE BIG dog", "The BIG dog"),
    ({"type": "paragraph_first_word", "count": 2, "nth": 2, "word": "then"}, "First.\n\n\"Then, more.",
     "First.\n\nAfter that."),
]


def test_every_constraint_kind_is_exercised() -> None:
    assert {case[0]["type"] for case in CASES} == set(CONSTRAINTS)
    assert len(CONSTRAINTS) >= 10


@pytest.mark.parametrize("constraint, good, bad", CASES, ids=[case[0]["type"] for case in CASES])
def test_constraint(constraint, good, bad) -> None:
    verifier = InstructionFollowingVerifier(InstructionFollowingConfig())
    ok, not_ok = verifier.score([
        RewardSample("g", "instruction_following", "", good, {"constraints": [constraint]}),
        RewardSample("b", "instruction_following", "", bad, {"constraints": [constraint]}),
    ])
    assert ok.verdict is Verdict.OK and ok.reward == 1.0, ok.detail
    assert not_ok.verdict is Verdict.WRONG_ANSWER and not_ok.reward == 0.0


def test_partial_credit() -> None:
    verifier = InstructionFollowingVerifier(InstructionFollowingConfig(partial_credit=True))
    constraints = [{"type": "lowercase"}, {"type": "no_commas"}]
    (result,) = verifier.score([RewardSample("p", "instruction_following", "", "a, b", constraints)])
    assert result.reward == 0.5 and result.status is RewardStatus.FAILED_VERIFICATION


@pytest.mark.parametrize("ground_truth", [[], [{"type": "rhyme"}], [{"type": "word_count", "min": -1}],
                                          [{"type": "include_keywords"}], {"constraints": "lowercase"}])
def test_malformed_constraints_name_the_problem(ground_truth) -> None:
    verifier = InstructionFollowingVerifier(InstructionFollowingConfig())
    (result,) = verifier.score([RewardSample("c3", "instruction_following", "", "x", ground_truth)])
    assert result.status is RewardStatus.INFRA_ERROR and result.verdict is Verdict.INVALID_INPUT
    assert "c3" in result.detail
