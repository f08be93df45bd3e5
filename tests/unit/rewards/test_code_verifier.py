"""Code verifier through the real sandbox: benchmark problems (reference passes, wrong variants
fail), stdin/stdout programs, markdown extraction, and reward hacks that must never pass."""

from __future__ import annotations

import pytest

from megatron_rlhf.rewards.sample import RewardSample, RewardStatus, Verdict

# HumanEval/0 and HumanEval/32-style problems (the check uses a helper defined by the prompt).
HAS_CLOSE = {
    "prompt": "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
              "    \"\"\" Check if in given list of numbers, are any two numbers closer to each other than given threshold.\"\"\"\n",
    "test": "def check(candidate):\n"
            "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
            "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
            "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
            "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False\n"
            "    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True\n",
    "entry_point": "has_close_elements",
    "completion": "    for i, a in enumerate(numbers):\n        for j, b in enumerate(numbers):\n"
                  "            if i != j and abs(a - b) < threshold:\n                return True\n    return False\n",
    "wrong": "    return len(numbers) > 3\n",
}
FIND_ZERO = {
    "prompt": "import math\n\n\ndef poly(xs: list, x: float):\n    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])\n\n\n"
              "def find_zero(xs: list):\n    \"\"\"Find x such that poly(x) = 0.\"\"\"\n",
    "test": "import math, random\n\ndef check(candidate):\n    rng = random.Random(42)\n    for _ in range(50):\n"
            "        ncoeff = 2 * rng.randint(1, 4)\n        coeffs = [rng.randint(-10, 10) or 1 for _ in range(ncoeff)]\n"
            "        solution = candidate(coeffs)\n        assert math.fabs(poly(coeffs, solution)) < 1e-4\n",
    "entry_point": "find_zero",
    "completion": "    begin, end = -1., 1.\n    while poly(xs, begin) * poly(xs, end) > 0:\n        begin *= 2.0\n        end *= 2.0\n"
                  "    while end - begin > 1e-10:\n        center = (begin + end) / 2.0\n"
                  "        if poly(xs, center) * poly(xs, begin) > 0:\n            begin = center\n        else:\n            end = center\n    return begin\n",
    "wrong": "    return 0.0\n",
}
PROBLEMS = [HAS_CLOSE, FIND_ZERO]
MBPP_ASSERTS = {"asserts": ["assert remove_Occ(\"hello\",\"l\") == \"heo\"", "assert remove_Occ(\"abcda\",\"a\") == \"bcd\"",
                            "assert remove_Occ(\"PHP\",\"P\") == \"H\""]}
MBPP_GOOD = "def remove_Occ(s, ch):\n    s = s.replace(ch, '', 1)\n    i = s.rfind(ch)\n    return s if i < 0 else s[:i] + s[i + 1:]\n"
MBPP_BAD = "def remove_Occ(s, ch):\n    return s.replace(ch, '', 1)\n"
SUM_IO = {"io": [["1 2\n", "3\n"], ["10 -4\n", "6\n"], ["0 0\n", "0\n"]]}


def _sample(response: str, ground_truth, prompt: str = "", sample_id: str = "s") -> RewardSample:
    return RewardSample(sample_id, "code", prompt, response, ground_truth)


def _humaneval(problem: dict) -> dict:
    return {"test": problem["test"], "entry_point": problem["entry_point"]}


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p["entry_point"])
def test_reference_solutions_pass_and_wrong_variants_fail(code_verifier, problem) -> None:
    full = problem["prompt"] + problem["completion"]
    samples = [
        _sample(full, _humaneval(problem)),                                      # whole program
        _sample(f"Here it is:\n```python\n{full}```\nDone.", _humaneval(problem)),  # fenced
        _sample(problem["completion"], _humaneval(problem), prompt=problem["prompt"]),  # completion
        _sample(problem["prompt"] + problem["wrong"], _humaneval(problem)),
    ]
    results = code_verifier.score(samples)
    assert [r.verdict for r in results[:3]] == [Verdict.OK] * 3, [r.detail for r in results]
    assert results[3].status is RewardStatus.FAILED_VERIFICATION and results[3].reward == 0.0


def test_mbpp_asserts_and_stdio_programs(code_verifier) -> None:
    results = code_verifier.score([
        _sample(MBPP_GOOD, MBPP_ASSERTS), _sample(MBPP_BAD, MBPP_ASSERTS),
        _sample("a, b = map(int, input().split())\nprint(a + b)", SUM_IO),
        _sample("a, b = map(int, input().split())\nprint(a * b)", SUM_IO),
        _sample("import sys\nsys.exit(0)", SUM_IO),
    ])
    assert [r.verdict for r in results] == [Verdict.OK, Verdict.WRONG_ANSWER, Verdict.OK,
                                            Verdict.WRONG_ANSWER, Verdict.WRONG_ANSWER]
    assert "case 1/3" in results[3].detail


GOOD_BODY = "def has_close_elements(numbers, threshold):\n" + HAS_CLOSE["completion"]
HACKS = {
    "exit_before_tests": "import sys\nsys.exit(0)\n" + GOOD_BODY,
    "os_exit_before_tests": "import os\nos._exit(0)\n",
    "exit_inside_call": "def has_close_elements(numbers, threshold):\n    import os\n    os._exit(0)\n",
    "eq_always_true": "class Yes:\n    def __eq__(self, other): return True\n    def __bool__(self): return True\n"
                      "def has_close_elements(numbers, threshold):\n    return Yes()\n",
    "bool_subclass": "class B(int):\n    def __eq__(self, other): return True\n"
                     "def has_close_elements(numbers, threshold):\n    return B(1)\n",
    "patch_assertion_error": "import builtins\nbuiltins.AssertionError = type('Never', (Exception,), {})\n"
                             "def has_close_elements(numbers, threshold):\n    return None\n",
    "define_check": "def check(candidate):\n    return None\ndef has_close_elements(numbers, threshold):\n    return None\n",
    "patch_exit_functions": "import sys, os\nsys.exit = lambda *a: None\nos._exit = lambda *a: None\n"
                            "def has_close_elements(numbers, threshold):\n    raise SystemExit(0)\n",
    "patch_print": "import builtins\nbuiltins.print = lambda *a, **k: None\ndef has_close_elements(n, t):\n    return 3\n",
    "print_success_marker": "import json, os\nfor fd in range(0, 20):\n    try: os.write(fd, b'{\"result\": \"passed\", \"nonce\": \"\"}\\n')\n"
                            "    except OSError: pass\nprint(json.dumps({'result': 'passed'}))\n"
                            "def has_close_elements(n, t):\n    return False\n",
    "kill_the_tests": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + GOOD_BODY.replace("return True", "return False"),
    "stop_the_tests": "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n" + GOOD_BODY.replace("return True", "return False"),
    "read_tests_from_parent": "import os\nppid = os.getppid()\nleak = ''\nfor name in ('environ', 'mem', 'fd/0', 'fd/1'):\n"
                              "    try: leak += open(f'/proc/{ppid}/{name}', 'rb').read(100).decode('latin1')\n    except OSError: pass\n"
                              "def has_close_elements(n, t):\n    return 'candidate' in leak\n",
    "raise_keyboard_interrupt": "def has_close_elements(n, t):\n    raise KeyboardInterrupt\n",
    "return_generator": "def has_close_elements(n, t):\n    yield True\n",
    "infinite_recursion": "def has_close_elements(n, t):\n    return has_close_elements(n, t)\n",
}


@pytest.mark.parametrize("name", sorted(HACKS))
def test_reward_hacks_never_pass(code_verifier, name) -> None:
    (result,) = code_verifier.score([_sample(HACKS[name], _humaneval(HAS_CLOSE))])
    assert result.status is RewardStatus.FAILED_VERIFICATION, (result.verdict, result.detail)
    assert result.reward == 0.0


def test_the_harness_verdict_needs_this_executions_nonce(code_verifier) -> None:
    """A correct answer passes; the same candidate printing a forged pass line still only passes
    through the real harness report (and a forged report alone is never enough)."""
    (honest,) = code_verifier.score([_sample(GOOD_BODY, _humaneval(HAS_CLOSE))])
    assert honest.verdict is Verdict.OK
    forged = "print('{\"result\": \"passed\", \"nonce\": \"0\"}')\ndef has_close_elements(n, t):\n    return False\n"
    (result,) = code_verifier.score([_sample(forged, _humaneval(HAS_CLOSE))])
    assert result.verdict is Verdict.WRONG_ANSWER


def test_limits_give_judge_verdicts(sandbox) -> None:
    from megatron_rlhf.rewards.sandbox.config import ExecutionLimits
    from megatron_rlhf.rewards.verifiers.code_verifier import CodeVerifier, CodeVerifierConfig

    short = CodeVerifier(CodeVerifierConfig(limits=ExecutionLimits(wall_seconds=2.0, cpu_seconds=1)), sandbox=sandbox)
    results = short.score([
        _sample("def has_close_elements(n, t):\n    while True: pass\n", _humaneval(HAS_CLOSE)),
        _sample("def has_close_elements(n, t):\n    return bytearray(10**10)\n", _humaneval(HAS_CLOSE)),
        _sample("while True: print('x' * 1000)", SUM_IO),
        _sample("print(1/0)", SUM_IO),
    ])
    short.close()
    assert [r.verdict for r in results] == [Verdict.TIME_LIMIT, Verdict.MEMORY_LIMIT, Verdict.OUTPUT_LIMIT,
                                            Verdict.RUNTIME_ERROR]


@pytest.mark.parametrize("ground_truth", [None, "not json", {"io": []}, {"io": [["1"]]}, {"test": "def check(:"},
                                          {"test": "assert True", "entry_point": "f"}, {"asserts": "x"}])
def test_bad_ground_truth_is_an_infra_error_naming_the_sample(code_verifier, ground_truth) -> None:
    (result,) = code_verifier.score([_sample("print(1)", ground_truth, sample_id="bad-7")])
    assert result.status is RewardStatus.INFRA_ERROR and result.verdict is Verdict.INVALID_INPUT
    assert "bad-7" in result.detail
