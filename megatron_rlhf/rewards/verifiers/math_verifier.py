"""Math verifier: final-answer extraction in the parent, equivalence by math-verify in the sandbox.

The parent extracts the final answer (``math_extract``: boxed, "the answer is", last number) and
applies the anti-spraying rules with plain string code. Only the short extracted answer and the
reference answer are sent to a long-lived math-verify worker that runs in the code sandbox
(math-verify parses with sympy's ``parse_expr``, which evaluates text; model text never reaches it
in the trainer's process).

Hard per-sample time limit: the parent waits for the worker's reply with a deadline on a pipe
(``select``), and at the deadline kills the worker's whole sandbox and starts a fresh one. No
signals are involved, so the limit holds when ``score`` is called from worker threads or Ray
actors. A sample whose check overran is an INFRA_ERROR (verdict SCORER_TIME_LIMIT): the scorer,
not the response, failed. math-verify's own internal timeout (``math_verify_timeout_seconds``,
below the hard limit) turns slow comparisons into "not equal" before that.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import select
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from megatron_rlhf.rewards.sample import RewardResult, RewardSample, Verdict
from megatron_rlhf.rewards.sandbox.config import MIB, ExecutionLimits, SandboxConfig
from megatron_rlhf.rewards.sandbox.executor import Sandbox
from megatron_rlhf.rewards.sandbox.isolation import FILES_DIR
from megatron_rlhf.rewards.sandbox.process import ExecutionRequest, SandboxProcess
from megatron_rlhf.rewards.verifiers.math_extract import extract_final_answer

WORKER_SCRIPT = Path(__file__).resolve().parent / "harness" / "math_worker.py"
DAY = 86400


@dataclass(frozen=True)
class MathVerifierConfig:
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Isolation of the math-verify workers."""
    time_limit_seconds: float = 10.0
    """Hard wall-clock limit of one sample's equivalence check (parent-enforced). > 0."""
    math_verify_timeout_seconds: int = 5
    """math-verify's own parse/compare timeout inside the worker (whole seconds, >= 1); keep it
    below time_limit_seconds so that slow comparisons end as 'not equal'."""
    workers: int = 2
    """Parallel math-verify workers (each a sandbox holding sympy, about 150 MB). >= 1."""
    worker_memory_bytes: int = 1024 * MIB
    """Memory limit of one worker's sandbox."""
    worker_start_seconds: float = 120.0
    """Time a fresh worker may take to import math-verify (not counted against a sample)."""
    requests_per_worker: int = 2000
    """A worker is replaced after this many checks (bounds sympy's caches). >= 1."""
    max_answer_chars: int = 1000
    """Longer extracted answers are not credited and never sent to math-verify. >= 1."""

    def __post_init__(self) -> None:
        if not self.time_limit_seconds > 0:
            raise ValueError(f"math time_limit_seconds must be > 0, got {self.time_limit_seconds!r}")
        for name in ("math_verify_timeout_seconds", "workers", "requests_per_worker", "max_answer_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"math verifier {name} must be a positive integer, got {value!r}")


class ScorerFailed(Exception):
    def __init__(self, verdict: Verdict, detail: str) -> None:
        super().__init__(detail)
        self.verdict = verdict


class MathWorker:
    """One sandboxed math-verify process and its line protocol."""

    def __init__(self, sandbox: Sandbox, config: MathVerifierConfig, site_packages: str) -> None:
        limits = ExecutionLimits(
            wall_seconds=DAY, cpu_seconds=DAY, memory_bytes=config.worker_memory_bytes,
            max_processes=16, max_open_files=256,
        )
        self.process: SandboxProcess = sandbox.start(
            ExecutionRequest(
                command=sandbox.python_command(
                    f"{FILES_DIR}/math_worker.py", site_packages, str(config.math_verify_timeout_seconds)
                ),
                harness_files={"math_worker.py": WORKER_SCRIPT.read_bytes()},
                limits=limits,
                ro_binds=(site_packages,),
            )
        )
        self.requests = 0
        self._buffer = b""
        try:
            ready = self._read_message(config.worker_start_seconds, "starting")
        except ScorerFailed as failure:  # say why: bwrap's or the interpreter's own message
            os.set_blocking(self.process.stderr_fd, False)
            try:
                why = os.read(self.process.stderr_fd, 4096).decode("utf-8", "replace").strip()
            except OSError:
                why = ""
            self.close()
            raise ScorerFailed(failure.verdict, f"{failure}: {why[-1000:]}" if why else str(failure)) from None
        if not ready.get("ready"):
            self.close()
            raise ScorerFailed(Verdict.SCORER_ERROR, f"math worker failed to start: {ready.get('error', ready)}")

    def check(self, gold: str, answer: str, timeout: float) -> dict[str, Any]:
        self.requests += 1
        line = json.dumps({"gold": gold, "answer": answer}).encode() + b"\n"
        try:
            os.write(self.process.stdin_fd, line)
        except OSError as error:
            raise ScorerFailed(Verdict.SCORER_ERROR, f"math worker is gone: {error}") from None
        return self._read_message(timeout, "checking")

    def _read_message(self, timeout: float, doing: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScorerFailed(Verdict.SCORER_TIME_LIMIT, f"math check over its {timeout:g} s hard limit ({doing})")
            readable, _, _ = select.select([self.process.stdout_fd], [], [], remaining)
            if readable:
                chunk = os.read(self.process.stdout_fd, 65536)
                if not chunk:
                    raise ScorerFailed(Verdict.SCORER_ERROR, f"math worker exited while {doing}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.process.close()


class MathVerifier:
    """:class:`~megatron_rlhf.rewards.interface.RewardSource` for ``domain: math``."""

    name = "math"

    def __init__(self, config: MathVerifierConfig, sandbox: Sandbox | None = None) -> None:
        self.config = config
        self._owns_sandbox = sandbox is None
        self.sandbox = sandbox if sandbox is not None else Sandbox(config.sandbox)
        spec = importlib.util.find_spec("math_verify")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("math-verify is not installed (scripts/bootstrap_env.sh installs it)")
        self.site_packages = str(Path(list(spec.submodule_search_locations)[0]).parent)
        self._local = threading.local()
        self._workers: list[MathWorker] = []
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(config.workers, thread_name_prefix="math-verifier")

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        return list(self._pool.map(self.score_one, samples))

    def score_one(self, sample: RewardSample) -> RewardResult:
        started = time.monotonic()
        result = self._score(sample)
        return RewardResult(result.reward, result.status, result.verdict, result.detail, time.monotonic() - started)

    def _score(self, sample: RewardSample) -> RewardResult:
        gold = reference_answer(sample.ground_truth)
        if gold is None:
            return RewardResult.infra_error(
                Verdict.INVALID_INPUT,
                f"sample {sample.sample_id!r}: math ground_truth must be the reference answer "
                f"(a string or number), got {type(sample.ground_truth).__name__}",
            )
        extracted = extract_final_answer(sample.response, gold, self.config.max_answer_chars)
        if extracted.rejection is not None:
            return RewardResult.incorrect(Verdict.WRONG_ANSWER, extracted.rejection)
        if extracted.answer is None:
            return RewardResult.incorrect(Verdict.NO_ANSWER, "no final answer found")
        answer = extracted.answer.encode("utf-8", "replace").decode("utf-8")  # lone surrogates
        try:
            reply = self._check(gold, answer)
        except ScorerFailed as failure:
            return RewardResult.infra_error(failure.verdict, str(failure))
        except Exception as error:  # spawn failure, protocol error: the scorer failed
            self._drop_worker()
            return RewardResult.infra_error(Verdict.SCORER_ERROR, f"{type(error).__name__}: {error}")
        if "gold_error" in reply:
            return RewardResult.infra_error(Verdict.INVALID_INPUT, f"reference {gold!r}: {reply['gold_error']}")
        detail = f"{extracted.method} answer {answer[:100]!r} vs reference {gold[:100]!r}"
        if reply.get("equal") is True:
            return RewardResult.correct(detail)
        return RewardResult.incorrect(Verdict.WRONG_ANSWER, detail)

    def _check(self, gold: str, answer: str) -> dict[str, Any]:
        worker = getattr(self._local, "worker", None)
        if worker is None or worker.requests >= self.config.requests_per_worker:
            self._drop_worker()
            worker = MathWorker(self.sandbox, self.config, self.site_packages)
            self._local.worker = worker
            with self._lock:
                self._workers.append(worker)
        try:
            return worker.check(gold, answer, self.config.time_limit_seconds)
        except ScorerFailed:
            self._drop_worker()  # overran or died: kill its sandbox, the next sample gets a fresh one
            raise

    def _drop_worker(self) -> None:
        worker = getattr(self._local, "worker", None)
        self._local.worker = None
        if worker is not None:
            worker.close()
            with self._lock:
                if worker in self._workers:
                    self._workers.remove(worker)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.close()
        if self._owns_sandbox:
            self.sandbox.close()


def reference_answer(ground_truth: Any) -> str | None:
    """The reference answer string from a math ground truth (string, number, or {"answer": ...})."""
    if isinstance(ground_truth, dict) and set(ground_truth) == {"answer"}:
        ground_truth = ground_truth["answer"]
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        return None
    text = str(ground_truth).strip()
    return text or None
