"""Every verifier answers with a status, never an exception, on empty, whitespace-only, 1 MB,
invalid UTF-8 and deeply nested responses (each inside its own time limit: the code verifier's
sandbox limit, the math verifier's hard limit; the pure-string verifiers are linear-time)."""

from __future__ import annotations

import pytest

from megatron_rlhf.rewards.sample import RewardSample, RewardStatus
from megatron_rlhf.rewards.verifiers.instruction_following import (
    InstructionFollowingConfig,
    InstructionFollowingVerifier,
)
from megatron_rlhf.rewards.verifiers.multiple_choice import MultipleChoiceConfig, MultipleChoiceVerifier

MB = 1024 * 1024
HOSTILE = {
    "empty": "",
    "whitespace": " \n\t\r\n   ",
    "one_megabyte_text": "word " * (MB // 5),
    "one_megabyte_digits": "9" * MB,
    "invalid_utf8": b"\xff\xfe answer \xc3\x28 \\boxed{5} \xed\xa0\x80".decode("utf-8", "surrogateescape"),
    "nested_boxes": "\\boxed{" * 50_000 + "1" + "}" * 50_000,
    "nested_brackets": "[" * 200_000 + "]" * 200_000,
    "nested_parens_code": "x = " + "(" * 100_000 + ")" * 100_000,
    "nested_fences": "```python\n" * 10_000,
    "answer_phrases": "The answer is " * 50_000,
}
GROUND_TRUTH = {
    "math": "4",
    "code": {"test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "f"},
    "multiple_choice": "A",
    "instruction_following": {"constraints": [{"type": "json_format"}, {"type": "word_count", "max": 10}]},
}


@pytest.fixture(scope="module")
def verifiers(math_verifier, code_verifier):
    return {
        "math": math_verifier,
        "code": code_verifier,
        "multiple_choice": MultipleChoiceVerifier(MultipleChoiceConfig()),
        "instruction_following": InstructionFollowingVerifier(InstructionFollowingConfig()),
    }


@pytest.mark.parametrize("domain", sorted(GROUND_TRUTH))
def test_hostile_responses_get_a_status(verifiers, domain) -> None:
    samples = [RewardSample(name, domain, "", text, GROUND_TRUTH[domain]) for name, text in HOSTILE.items()]
    results = verifiers[domain].score(samples)
    assert len(results) == len(samples)
    for name, result in zip(HOSTILE, results):
        assert isinstance(result.status, RewardStatus), name
        assert result.status is not RewardStatus.SCORED, (name, result)  # none of these is a right answer
        assert result.status is RewardStatus.FAILED_VERIFICATION, (name, result.verdict, result.detail)


def test_invalid_utf8_code_still_runs_in_the_sandbox(code_verifier) -> None:
    response = "def f(x):\n    return x + 1  # \udcff\udcfe\n"
    (result,) = code_verifier.score([RewardSample("u", "code", "", response, GROUND_TRUTH["code"])])
    assert result.status is RewardStatus.SCORED
