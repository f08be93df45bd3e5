"""Math verifier: extraction rules, anti-spraying, equivalence via math-verify in the sandbox, and the
hard per-sample time limit from a worker thread."""

from __future__ import annotations

import threading

import pytest

from megatron_rlhf.rewards.sample import RewardSample, RewardStatus, Verdict
from megatron_rlhf.rewards.verifiers.math_extract import extract_final_answer
from megatron_rlhf.rewards.verifiers.math_verifier import MathVerifier, MathVerifierConfig

EQUIVALENT = [
    ("\\frac{1}{2}", "The answer is $\\boxed{0.5}$."),
    ("\\frac{1}{2}", "so we get \\boxed{1/2}"),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"),
    ("x^2+2x+1", "\\boxed{(x+1)^2}"),
    ("42", "The answer is 42."),
    ("1234", "#### 1,234"),
    ("3", "First 2 apples, then 3 more... total 3"),
    ("\\pi", "Final answer: $\\pi$"),
    ("\\{1, 2\\}", "\\boxed{\\{2, 1\\}}"),
    ("-7", "\\boxed{ -7 }"),
]
NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "\\boxed{0.51}"),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{2}}"),
    ("42", "The answer is 24."),
    ("x^2+1", "\\boxed{x^2-1}"),
    ("5", "I am not sure."),
]


def _sample(response: str, reference) -> RewardSample:
    return RewardSample("m", "math", "", response, reference)


def test_equivalent_answers_are_credited(math_verifier) -> None:
    results = math_verifier.score([_sample(response, gold) for gold, response in EQUIVALENT])
    assert [r.verdict for r in results] == [Verdict.OK] * len(EQUIVALENT), [r.detail for r in results]
    assert all(r.reward == 1.0 for r in results)


def test_different_answers_are_not(math_verifier) -> None:
    results = math_verifier.score([_sample(response, gold) for gold, response in NOT_EQUIVALENT])
    assert all(r.status is RewardStatus.FAILED_VERIFICATION and r.reward == 0.0 for r in results)
    assert results[-1].verdict is Verdict.NO_ANSWER


@pytest.mark.parametrize("response", [
    "\\boxed{2} or maybe \\boxed{3} or \\boxed{4}",
    "The answer is 2 or 3.",
    "\\boxed{2 \\lor 3}",
    "\\boxed{\\text{either } 2 \\text{ or } 3}",
])
def test_answer_spraying_is_not_credited(math_verifier, response) -> None:
    (result,) = math_verifier.score([_sample(response, "2")])
    assert result.verdict is Verdict.WRONG_ANSWER and "spraying" in result.detail


def test_alternatives_allowed_when_the_reference_has_them() -> None:
    assert extract_final_answer("\\boxed{x=1 \\text{ or } x=2}", "x=1 \\text{ or } x=2", 100).answer is not None


def test_repeated_identical_boxes_are_one_answer() -> None:
    assert extract_final_answer("\\boxed{7}. Check: \\boxed{ 7 }", "7", 100).answer == "7"


def test_model_text_never_reaches_sympy_in_the_trainer() -> None:
    """An answer that would run code if eval'd is compared inside the sandbox; the trainer process
    never imports sympy or math-verify. Checked in a fresh interpreter: in the test session other
    libraries (torch, transformers, vLLM) import sympy for their own reasons."""
    import subprocess
    import sys

    program = """
import sys
from megatron_rlhf.rewards.sample import RewardSample, RewardStatus
from megatron_rlhf.rewards.sandbox.executor import Sandbox, SandboxConfig
from megatron_rlhf.rewards.verifiers.math_verifier import MathVerifier, MathVerifierConfig
with Sandbox(SandboxConfig()) as sandbox:
    verifier = MathVerifier(MathVerifierConfig(), sandbox=sandbox)
    answer = "\\\\boxed{__import__('os').system('touch /tmp/pwned')}"
    (result,) = verifier.score([RewardSample("m", "math", "", answer, "1")])
    verifier.close()
assert result.status is RewardStatus.FAILED_VERIFICATION, result
leaked = [name for name in ("math_verify", "sympy") if name in sys.modules]
assert not leaked, leaked
print("clean")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("clean"), done.stderr[-2000:]


def test_hard_time_limit_holds_in_a_worker_thread(sandbox) -> None:
    """math-verify's own (signal-based) timeout is set above the hard limit here, so only the
    parent's deadline can stop the slow comparison; it runs from a non-main thread."""
    verifier = MathVerifier(MathVerifierConfig(time_limit_seconds=0.5, math_verify_timeout_seconds=3), sandbox=sandbox)
    results = []
    try:
        worker = threading.Thread(target=lambda: results.extend(verifier.score([
            _sample("\\boxed{9^{9^{9^{9}}}}", "1"),
            _sample("\\boxed{1}", "1"),  # a fresh worker takes over after the kill
        ])))
        worker.start()
        worker.join()
    finally:
        verifier.close()
    assert results[0].status is RewardStatus.INFRA_ERROR and results[0].reward is None
    assert results[0].verdict is Verdict.SCORER_TIME_LIMIT
    assert results[1].verdict is Verdict.OK


@pytest.mark.parametrize("reference", [None, [1, 2], {"x": 1}, "  "])
def test_unusable_reference_is_an_infra_error(math_verifier, reference) -> None:
    (result,) = math_verifier.score([_sample("\\boxed{1}", reference)])
    assert result.status is RewardStatus.INFRA_ERROR and result.verdict is Verdict.INVALID_INPUT
