"""The sandbox's front door: run a request under hard limits and label the outcome like a judge.

:meth:`Sandbox.run` starts an execution (see :mod:`.process` and :mod:`.isolation`), feeds its
stdin, reads stdout and stderr up to the output limit, kills it at the wall-clock limit, and returns
an :class:`ExecutionResult` whose verdict is OK, runtime error, time limit, memory limit or output
limit (wrong answer is the caller's call, made on the output), or SCORER_ERROR when the sandbox
itself could not be set up. :meth:`Sandbox.run_many` runs requests in parallel, at most
``max_concurrency`` at a time. :meth:`Sandbox.start` hands a running execution to callers that talk
to a long-lived sandboxed worker (the math checker).

Every execution is a separate process tree started from a fresh ``exec``; the trainer's own process
never runs untrusted code. Isolation is resolved once, at construction: a layer the config asks for
and the machine lacks raises :class:`SandboxUnavailable` there, before anything runs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import selectors
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from megatron_rlhf.rewards.sample import Verdict
from megatron_rlhf.rewards.sandbox.config import ExecutionLimits, SandboxConfig
from megatron_rlhf.rewards.sandbox.isolation import (
    SandboxUnavailable,
    interpreter_binds,
    resolve_isolation,
)
from megatron_rlhf.rewards.sandbox.process import ExecutionRequest, SandboxProcess, UidPool

logger = logging.getLogger(__name__)

SIGKILL_STATUS, SIGXCPU_STATUS = 128 + 9, 128 + 24
PIPE_CHUNK = 65536


@dataclass(frozen=True)
class ExecutionResult:
    verdict: Verdict
    """OK, RUNTIME_ERROR, TIME_LIMIT, MEMORY_LIMIT, OUTPUT_LIMIT, or SCORER_ERROR (sandbox failed)."""
    exit_status: int | None
    """The program's exit code, 128 + signal number when a signal ended it; None if never started."""
    stdout: bytes
    stderr: bytes
    wall_seconds: float
    detail: str = ""
    memory_limit_hit: bool = False
    """The execution's cgroup recorded a failed memory charge or an OOM kill."""


class Sandbox:
    """Runs untrusted programs in isolated, limited, throw-away process trees."""

    _names = itertools.count()

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.plan = resolve_isolation(config)
        self._uids = UidPool(config.sandbox_uid_base) if self.plan.dedicated_uids else None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        for layer, on in (
            ("namespaces", config.namespaces),
            ("seccomp", config.seccomp),
            ("cgroups", config.cgroups),
        ):
            if not on:
                logger.warning("sandbox: %s are OFF by configuration (explicit opt-out)", layer)
        self.python = self._choose_interpreter()

    # --- interpreter -----------------------------------------------------------------------

    def _choose_interpreter(self) -> str:
        """The first candidate interpreter that starts inside the sandbox (a real probe run)."""
        if self.config.python_executable is not None:
            candidates = [self.config.python_executable]
        else:
            candidates = [os.path.realpath(sys.executable), "/usr/bin/python3"]
        failures = []
        for candidate in dict.fromkeys(candidates):
            probe = ExecutionRequest(
                command=(candidate, "-I", "-c", "import sys; print(sys.version_info[0])"),
                ro_binds=tuple(interpreter_binds(candidate)),
                limits=ExecutionLimits(wall_seconds=30.0),
            )
            result = self._communicate_and_close(self._spawn(probe), probe.stdin)
            if result.verdict is Verdict.OK and result.stdout.strip() == b"3":
                return candidate
            failures.append(f"{candidate}: {result.verdict.value}: {result.detail}".strip())
        raise SandboxUnavailable(
            "no Python interpreter starts inside the sandbox; tried " + "; ".join(failures)
            + ". Set sandbox.python_executable to an interpreter the sandbox user can read."
        )

    def python_command(self, script: str, *arguments: str) -> tuple[str, ...]:
        """Command running ``script`` (a sandbox path) with the sandbox's interpreter, isolated mode."""
        return (self.python, "-I", "-B", script, *arguments)

    # --- running ---------------------------------------------------------------------------

    def start(self, request: ExecutionRequest) -> SandboxProcess:
        """Start an execution and return it running; the caller must :meth:`SandboxProcess.close` it."""
        binds = tuple(dict.fromkeys((*interpreter_binds(self.python), *request.ro_binds)))
        return self._spawn(dataclasses.replace(request, ro_binds=binds))

    def _spawn(self, request: ExecutionRequest) -> SandboxProcess:
        limits = request.limits or self.config.limits
        name = f"mrlhf-sbx-{os.getpid()}-{next(self._names)}"
        return SandboxProcess(self.plan, request, limits, self._uids, name)

    def run(self, request: ExecutionRequest) -> ExecutionResult:
        """Run to completion (or to a limit). Never raises for anything the program does."""
        return self._communicate_and_close(self.start(request), request.stdin)

    @staticmethod
    def _communicate_and_close(process: SandboxProcess, stdin: bytes) -> ExecutionResult:
        try:
            return _communicate(process, stdin)
        finally:
            process.close()

    def run_many(self, requests: Sequence[ExecutionRequest]) -> list[ExecutionResult]:
        """Run requests in parallel, ``config.max_concurrency`` at a time; results in order."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.config.max_concurrency, thread_name_prefix="sandbox"
                )
            pool = self._pool
        return list(pool.map(self.run, requests))

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _communicate(process: SandboxProcess, stdin: bytes) -> ExecutionResult:
    """Feed stdin, collect output under the limits, wait, and classify."""
    limits = process.limits
    deadline = process.started_at + limits.wall_seconds
    selector = selectors.DefaultSelector()
    output = {process.stdout_fd: bytearray(), process.stderr_fd: bytearray()}
    info = bytearray()
    started = False
    for fd in (process.stdout_fd, process.stderr_fd, process.start_fd):
        selector.register(fd, selectors.EVENT_READ)
    if process.info_fd is not None:
        selector.register(process.info_fd, selectors.EVENT_READ)
    pending_stdin = memoryview(stdin)
    if pending_stdin:
        os.set_blocking(process.stdin_fd, False)
        selector.register(process.stdin_fd, selectors.EVENT_WRITE)
    else:
        process.close_stdin()
    killed_for: Verdict | None = None
    while selector.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            killed_for = Verdict.TIME_LIMIT
            break
        for key, _ in selector.select(remaining):
            fd = key.fd
            if fd == process.stdin_fd:
                try:
                    pending_stdin = pending_stdin[os.write(fd, pending_stdin[:PIPE_CHUNK]):]
                except (BrokenPipeError, BlockingIOError) as error:
                    if isinstance(error, BlockingIOError):
                        continue
                    pending_stdin = memoryview(b"")
                if not pending_stdin:
                    selector.unregister(fd)
                    process.close_stdin()
                continue
            chunk = os.read(fd, PIPE_CHUNK)
            if not chunk:
                selector.unregister(fd)
                continue
            if fd == process.start_fd:
                started = True
            elif fd == process.info_fd:
                info += chunk
                if b"}" in info:
                    process.note_sandbox_info(bytes(info))
            else:
                output[fd] += chunk
                total = sum(len(buffer) for buffer in output.values())
                if total > limits.max_output_bytes:
                    killed_for = Verdict.OUTPUT_LIMIT
                    break
        if killed_for is not None:
            break
    selector.close()
    status = None
    if killed_for is None:
        try:
            status = process.wait(max(deadline - time.monotonic(), 0.0))
        except Exception:  # subprocess.TimeoutExpired: alive past the deadline with pipes closed
            killed_for = Verdict.TIME_LIMIT
    if killed_for is not None:
        process.kill()
        status = process.wait(None)
    wall = time.monotonic() - process.started_at
    stdout = bytes(output[process.stdout_fd][: limits.max_output_bytes])
    stderr = bytes(output[process.stderr_fd][: limits.max_output_bytes])
    if not started and killed_for is None:
        text = stderr.decode("utf-8", "replace").strip()
        return ExecutionResult(Verdict.SCORER_ERROR, None, stdout, stderr, wall,
                               f"sandbox did not start (status {status}): {text[-500:]}")
    memory_hit = process.cgroup is not None and process.cgroup.memory_limit_hit()
    verdict = killed_for or _classify(status, stderr, memory_hit, wall >= limits.cpu_seconds)
    detail = {
        Verdict.TIME_LIMIT: f"killed at the {limits.wall_seconds:g} s wall-clock limit"
        if killed_for is Verdict.TIME_LIMIT else "CPU-time limit",
        Verdict.OUTPUT_LIMIT: f"more than {limits.max_output_bytes} bytes of output",
        Verdict.MEMORY_LIMIT: f"memory limit of {limits.memory_bytes} bytes",
        Verdict.RUNTIME_ERROR: f"exit status {status}",
    }.get(verdict, "")
    return ExecutionResult(verdict, status, stdout, stderr, wall, detail, memory_hit)


def _classify(status: int | None, stderr: bytes, memory_hit: bool, ran_cpu_limit: bool) -> Verdict:
    """Label an execution that ended by itself. The program is its namespace's init, which does
    not receive SIGXCPU (default action) at the soft CPU limit, only SIGKILL one second later: a
    SIGKILL with no memory event after at least cpu_seconds of wall time is the CPU limit."""
    if status == 0:
        return Verdict.OK
    if memory_hit or b"MemoryError" in stderr[-2000:]:
        return Verdict.MEMORY_LIMIT
    if status == SIGXCPU_STATUS or (status == SIGKILL_STATUS and ran_cpu_limit):
        return Verdict.TIME_LIMIT
    return Verdict.RUNTIME_ERROR
