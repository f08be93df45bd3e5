"""Code verifier: runs the response's code against its tests in the sandbox, judges in the parent.

Function tests (HumanEval/MBPP): one sandbox execution holding two processes, the test harness
(trusted tests, a per-execution random nonce) and the candidate runner (the model's code); see
``harness/check_harness.py`` for why the candidate cannot forge a pass. The parent credits a pass
only when the harness's report carries this execution's nonce.

Stdin/stdout tests: one sandbox execution per case (a fresh process tree each), stopping at the
first failing case; the parent compares the normalised stdout with the expected one, so the
program never sees the expected output.

Verdicts: OK, wrong answer, runtime error, time limit, memory limit, output limit (FAILED_VERIFICATION
with reward 0), or SCORER_ERROR / INVALID_INPUT (INFRA_ERROR: the sandbox could not run, the ground
truth is unusable). Responses are never executed outside the sandbox.
"""

from __future__ import annotations

import concurrent.futures
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_rlhf.rewards.sample import RewardResult, RewardSample, Verdict
from megatron_rlhf.rewards.sandbox.config import ExecutionLimits, SandboxConfig
from megatron_rlhf.rewards.sandbox.executor import ExecutionResult, Sandbox
from megatron_rlhf.rewards.sandbox.isolation import FILES_DIR, WORKDIR
from megatron_rlhf.rewards.sandbox.process import ExecutionRequest
from megatron_rlhf.rewards.verifiers import code_tests
from megatron_rlhf.rewards.verifiers.code_tests import FunctionTests, StdioTests

HARNESS_DIR = Path(__file__).resolve().parent / "harness"
HARNESS_FILES = ("check_harness.py", "candidate_runner.py", "value_codec.py")
FAILED_VERDICTS = {Verdict.TIME_LIMIT, Verdict.MEMORY_LIMIT, Verdict.OUTPUT_LIMIT, Verdict.RUNTIME_ERROR}


@dataclass(frozen=True)
class CodeVerifierConfig:
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Isolation and default limits; ``sandbox.max_concurrency`` executions run in parallel."""
    limits: ExecutionLimits = field(default_factory=lambda: ExecutionLimits(wall_seconds=10.0))
    """Limits of one execution (a function-test run, or one stdin/stdout case)."""
    max_code_bytes: int = 512 * 1024
    """Longer code is not run (verdict wrong answer). >= 1."""

    def __post_init__(self) -> None:
        if isinstance(self.max_code_bytes, bool) or not isinstance(self.max_code_bytes, int) or self.max_code_bytes < 1:
            raise ValueError(f"code verifier max_code_bytes must be a positive integer, got {self.max_code_bytes!r}")


class CodeVerifier:
    """:class:`~megatron_rlhf.rewards.interface.RewardSource` for ``domain: code``."""

    name = "code"

    def __init__(self, config: CodeVerifierConfig, sandbox: Sandbox | None = None) -> None:
        self.config = config
        self._owns_sandbox = sandbox is None
        self.sandbox = sandbox if sandbox is not None else Sandbox(config.sandbox)
        self._harness = {name: (HARNESS_DIR / name).read_bytes() for name in HARNESS_FILES}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.sandbox.config.max_concurrency, thread_name_prefix="code-verifier"
        )

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        return list(self._pool.map(self.score_one, samples))

    def score_one(self, sample: RewardSample) -> RewardResult:
        started = time.monotonic()
        try:
            result = self._score(sample)
        except Exception as error:  # a bug or a spawn failure: the scorer failed, not the response
            result = RewardResult.infra_error(Verdict.SCORER_ERROR, f"{type(error).__name__}: {error}")
        return _with_seconds(result, time.monotonic() - started)

    def _score(self, sample: RewardSample) -> RewardResult:
        try:
            tests = code_tests.parse_code_ground_truth(sample.ground_truth, f"sample {sample.sample_id!r}")
        except ValueError as error:
            return RewardResult.infra_error(Verdict.INVALID_INPUT, str(error))
        entry_point = tests.entry_point if isinstance(tests, FunctionTests) else None
        code = code_tests.extract_code(sample.response, entry_point)
        if not code.strip():
            return RewardResult.incorrect(Verdict.NO_ANSWER, "no code in the response")
        if isinstance(tests, FunctionTests) and entry_point is not None:
            code = _with_prompt_context(code, sample.prompt, entry_point)
        program = code.encode("utf-8", "surrogateescape")
        if len(program) > self.config.max_code_bytes:
            return RewardResult.incorrect(
                Verdict.WRONG_ANSWER, f"code of {len(program)} bytes is over max_code_bytes"
            )
        if isinstance(tests, StdioTests):
            return self._run_stdio(program, tests)
        return self._run_function_tests(program, tests)

    def _run_function_tests(self, program: bytes, tests: FunctionTests) -> RewardResult:
        nonce = secrets.token_hex(16)
        request = {
            "nonce": nonce,
            "test": tests.test_code,
            "names": list(tests.candidate_names),
            "entry_point": tests.entry_point,
            "runner": f"{FILES_DIR}/candidate_runner.py",
            "candidate": f"{WORKDIR}/candidate.py",
        }
        execution = self.sandbox.run(
            ExecutionRequest(
                command=self.sandbox.python_command(
                    f"{FILES_DIR}/check_harness.py", f"{FILES_DIR}/candidate_runner.py",
                    f"{WORKDIR}/candidate.py",
                ),
                files={"candidate.py": program},
                harness_files=self._harness,
                stdin=json.dumps(request).encode(),
                limits=self.config.limits,
            )
        )
        if execution.verdict is not Verdict.OK:
            return _from_execution(execution)
        report = _last_json_line(execution.stdout)
        kind = report.get("result")
        if kind == "passed" and secrets.compare_digest(str(report.get("nonce", "")), nonce):
            return RewardResult.correct("all tests passed")
        detail = str(report.get("detail", ""))[:1000]
        if kind == "wrong_answer":
            return RewardResult.incorrect(Verdict.WRONG_ANSWER, detail)
        if execution.memory_limit_hit or report.get("exception") == "MemoryError":
            return RewardResult.incorrect(Verdict.MEMORY_LIMIT, detail)
        if kind == "candidate_died" and "status 152" in detail:
            return RewardResult.incorrect(Verdict.TIME_LIMIT, detail)
        return RewardResult.incorrect(Verdict.RUNTIME_ERROR, detail or "no report from the tests")

    def _run_stdio(self, program: bytes, tests: StdioTests) -> RewardResult:
        for index, (stdin, expected) in enumerate(tests.cases):
            execution = self.sandbox.run(
                ExecutionRequest(
                    command=self.sandbox.python_command(f"{WORKDIR}/main.py"),
                    files={"main.py": program},
                    stdin=stdin.encode("utf-8", "surrogateescape"),
                    limits=self.config.limits,
                )
            )
            where = f"case {index + 1}/{len(tests.cases)}"
            if execution.verdict is not Verdict.OK:
                return _from_execution(execution, where)
            got = code_tests.normalise_stdout(execution.stdout.decode("utf-8", "replace"))
            if got != code_tests.normalise_stdout(expected):
                shown = "\n".join(got)[:200]
                return RewardResult.incorrect(
                    Verdict.WRONG_ANSWER, f"{where}: expected {expected[:200]!r}, got {shown!r}"
                )
        return RewardResult.correct(f"passed {len(tests.cases)}/{len(tests.cases)} cases")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._owns_sandbox:
            self.sandbox.close()


def _with_prompt_context(code: str, prompt: str, entry_point: str) -> str:
    """HumanEval completions: prepend the prompt's code (or at least its imports)."""
    prompt_code = code_tests.extract_code(prompt, entry_point)
    if not code_tests.defines(prompt_code, entry_point):
        return code
    if code_tests.defines(code, entry_point):
        imports = code_tests.import_lines(prompt_code)
        return f"{imports}\n{code}" if imports else code
    return f"{prompt_code}\n{code}"


def _from_execution(execution: ExecutionResult, where: str = "") -> RewardResult:
    prefix = f"{where}: " if where else ""
    if execution.verdict in FAILED_VERDICTS:
        tail = execution.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        detail = "; ".join([execution.detail, *tail])
        return RewardResult.incorrect(execution.verdict, prefix + detail[:1000])
    return RewardResult.infra_error(Verdict.SCORER_ERROR, prefix + execution.detail)


def _last_json_line(stdout: bytes) -> dict:
    lines = stdout.strip().splitlines()
    if not lines:
        return {}
    try:
        report = json.loads(lines[-1])
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def _with_seconds(result: RewardResult, seconds: float) -> RewardResult:
    return RewardResult(
        result.reward, result.status, result.verdict, result.detail, seconds, result.step_rewards
    )
