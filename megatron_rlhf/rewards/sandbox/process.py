"""One running sandbox execution: spawn, kill, and the clean-up that leaves nothing behind.

:class:`SandboxProcess` owns everything an execution creates on the host: the launch chain's
process group, the sandbox's PID-namespace init (watched through a pidfd), the execution's cgroup,
its dedicated uid and, only when namespaces are off, its host working directory. :meth:`close` is
idempotent and runs in ``finally`` blocks: it kills the process group, waits until the sandbox's
init is gone (its PID namespace is torn down synchronously when it exits, so every descendant is
gone with it), empties and removes the cgroup, releases the uid and removes the directory.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping

from megatron_rlhf.rewards.sandbox.config import ExecutionLimits
from megatron_rlhf.rewards.sandbox.isolation import (
    FILES_DIR,
    MARKER_VARIABLE,
    SYSTEM_PATH,
    WORKDIR,
    IsolationPlan,
    LaunchFiles,
    build_launch_argv,
)

UID_RANGE = 4096


@dataclass(frozen=True)
class ExecutionRequest:
    """What to run. Paths in ``command`` name sandbox paths (under WORKDIR or FILES_DIR)."""

    command: tuple[str, ...]
    files: Mapping[str, bytes] = field(default_factory=dict)
    """Written into the private working directory (writable by the program), by relative name."""
    harness_files: Mapping[str, bytes] = field(default_factory=dict)
    """Read-only files under FILES_DIR, by relative name (trusted harness scripts)."""
    stdin: bytes = b""
    limits: ExecutionLimits | None = None
    """None: the sandbox's default limits."""
    ro_binds: tuple[str, ...] = ()
    """Host directories made visible read-only at the same path (e.g. a site-packages)."""


UID_LOCK_DIRS = ("/run/lock", "/tmp")
"""Where the uid locks live (the first that is a writable folder): a fixed place, the same for every
process of the host whatever its TMPDIR, so that all of them see each other's locks."""


def uid_lock_dir() -> str:
    for parent in UID_LOCK_DIRS:
        if os.path.isdir(parent) and os.access(parent, os.W_OK):
            directory = os.path.join(parent, "megatron_rlhf_sandbox_uids")
            os.makedirs(directory, mode=0o700, exist_ok=True)
            return directory
    raise RuntimeError(f"no writable folder for the sandbox uid locks among {UID_LOCK_DIRS}")


def _lock_uid(directory: str, uid: int) -> int | None:
    """An fd holding ``uid``'s exclusive lock, or None when another open file holds it."""
    import fcntl

    fd = os.open(os.path.join(directory, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def uid_held_elsewhere(uid: int) -> bool:
    """Whether a live execution of some process on this host holds ``uid`` (its lock is taken).
    A sandboxed process whose uid nobody holds outlived its execution."""
    fd = _lock_uid(uid_lock_dir(), uid)
    if fd is None:
        return True
    os.close(fd)  # drops the lock this call took
    return False


class UidPool:
    """Dedicated uids for executions of a root trainer, one per running execution, handed out
    round-robin so that a uid is reused as late as possible.

    Host-wide: a uid is held through an exclusive ``flock`` on ``<uid_lock_dir()>/<uid>.lock``
    while its execution runs, and a uid another process holds is skipped, so two trainers (or two
    test workers) as root on one host never run executions under the same uid (which could then
    signal each other, and would share ``RLIMIT_NPROC``). The kernel drops a lock when its holder
    dies, SIGKILL included: nothing to clean up."""

    def __init__(self, base: int) -> None:
        self._base = base
        self._held: dict[int, int] = {}
        self._directory: str | None = None  # uid_lock_dir(), resolved at the first acquire
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if self._directory is None:
                self._directory = uid_lock_dir()
            for step in range(UID_RANGE):
                uid = self._base + (self._next + step) % UID_RANGE
                if uid in self._held:
                    continue
                fd = _lock_uid(self._directory, uid)
                if fd is None:  # another process's execution runs under it
                    continue
                self._held[uid] = fd
                self._next = (uid - self._base + 1) % UID_RANGE
                return uid
        raise RuntimeError(f"all {UID_RANGE} sandbox uids from {self._base} are in use on this host")

    def release(self, uid: int) -> None:
        with self._lock:
            fd = self._held.pop(uid, None)
            if fd is not None:
                os.close(fd)  # drops the lock


def _memfd(name: str, content: bytes) -> int:
    fd = os.memfd_create(name)  # close-on-exec: only the launch that names it in pass_fds gets it
    view = memoryview(content)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class SandboxProcess:
    """A started execution. Read ``stdout_fd``/``stderr_fd``, write ``stdin_fd``, then :meth:`close`."""

    def __init__(
        self,
        plan: IsolationPlan,
        request: ExecutionRequest,
        limits: ExecutionLimits,
        uids: UidPool | None,
        execution_name: str,
    ) -> None:
        self.limits = limits
        self.execution_name = execution_name
        self.started_at = time.monotonic()
        self._plan = plan
        self._uids = uids
        self._closed = False
        self._sandbox_pidfd: int | None = None
        self.start_fd: int | None = None
        self.info_fd: int | None = None
        self.uid = uids.acquire() if uids is not None else None
        self.cgroup = None
        self.host_dir: str | None = None
        passed_fds: list[int] = []
        try:
            if plan.cgroups is not None:
                self.cgroup = plan.cgroups.create(limits.memory_bytes, limits.max_processes)
            command = list(request.command)
            if plan.bwrap is None:
                command = self._prepare_host_dir(request, command)
                launch_files = []
            else:
                launch_files = [
                    (_memfd(name, content), f"{WORKDIR}/{name}", 0o644)
                    for name, content in request.files.items()
                ] + [
                    (_memfd(name, content), f"{FILES_DIR}/{name}", 0o444)
                    for name, content in request.harness_files.items()
                ]
                passed_fds += [fd for fd, _, _ in launch_files]
            seccomp_fd = None
            if plan.seccomp_bpf is not None:
                seccomp_fd = _memfd("seccomp", plan.seccomp_bpf)
                passed_fds.append(seccomp_fd)
            self.start_fd, start_write = os.pipe()
            passed_fds.append(start_write)
            info_write = None
            if plan.bwrap is not None:
                self.info_fd, info_write = os.pipe()
                passed_fds.append(info_write)
            argv = build_launch_argv(
                plan,
                limits,
                self.uid,
                self.cgroup,
                LaunchFiles(tuple(launch_files), seccomp_fd, start_write, info_write),
                command,
                list(request.ro_binds),
                execution_name,
            )
            env = {"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8", MARKER_VARIABLE: execution_name}
            if self.host_dir is not None:
                env.update(HOME=self.host_dir, TMPDIR=self.host_dir)
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=passed_fds,
                start_new_session=True,
                env=env,
                cwd=self.host_dir or "/",
            )
        except BaseException:
            for fd in passed_fds:
                os.close(fd)
            self.close()
            raise
        for fd in passed_fds:
            os.close(fd)
        assert self.popen.stdin and self.popen.stdout and self.popen.stderr
        self.stdin_fd = self.popen.stdin.fileno()
        self.stdout_fd = self.popen.stdout.fileno()
        self.stderr_fd = self.popen.stderr.fileno()

    def _prepare_host_dir(self, request: ExecutionRequest, command: list[str]) -> list[str]:
        """No namespaces: a host directory stands in for WORKDIR and FILES_DIR."""
        self.host_dir = tempfile.mkdtemp(prefix=f"{self.execution_name}-")
        files_dir = os.path.join(self.host_dir, ".sandbox")
        os.mkdir(files_dir)
        for name, content in request.files.items():
            with open(os.path.join(self.host_dir, name), "wb") as handle:
                handle.write(content)
        for name, content in request.harness_files.items():
            path = os.path.join(files_dir, name)
            with open(path, "wb") as handle:
                handle.write(content)
            os.chmod(path, 0o444)
        if self.uid is not None:
            for root, dirs, names in os.walk(self.host_dir):
                for name in [root, *(os.path.join(root, n) for n in dirs + names)]:
                    os.chown(name, self.uid, self.uid)

        def host_path(argument: str) -> str:
            for prefix, replacement in ((WORKDIR, self.host_dir), (FILES_DIR, files_dir)):
                if argument == prefix or argument.startswith(prefix + "/"):
                    return replacement + argument[len(prefix):]
            return argument

        return [host_path(argument) for argument in command]

    def note_sandbox_info(self, info: bytes) -> None:
        """bwrap's --info-fd JSON: watch the sandbox's init through a pidfd."""
        try:
            child_pid = int(json.loads(info.decode())["child-pid"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return
        try:
            self._sandbox_pidfd = os.pidfd_open(child_pid)
        except (ProcessLookupError, OSError):
            self._sandbox_pidfd = None

    def close_stdin(self) -> None:
        """Send EOF to the program (closes the parent's end once, through its file object)."""
        try:
            self.popen.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        """SIGKILL the sandbox's init (the namespace dies with it and bwrap, its parent, reaps it
        and exits), then, if bwrap has not exited within a few seconds, the launch chain's group."""
        if self._sandbox_pidfd is not None:
            try:
                signal.pidfd_send_signal(self._sandbox_pidfd, signal.SIGKILL)
                self.popen.wait(5.0)
            except (ProcessLookupError, OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float | None) -> int:
        """Exit status in shell form: the code, or 128 + signal number."""
        status = self.popen.wait(timeout)
        return 128 - status if status < 0 else status

    def close(self) -> None:
        """Kill everything the execution started and remove what it created (idempotent)."""
        if self._closed:
            return
        self._closed = True
        popen = getattr(self, "popen", None)
        try:
            if popen is not None:
                if popen.poll() is None:
                    self.kill()
                popen.wait()
                self.kill()  # anything left in the group (no namespaces: the program's children)
                for stream in (popen.stdin, popen.stdout, popen.stderr):
                    if stream is not None:
                        try:
                            stream.close()
                        except OSError:
                            pass
            if self._sandbox_pidfd is not None:
                select.select([self._sandbox_pidfd], [], [], 10.0)  # readable once it has exited
                os.close(self._sandbox_pidfd)
            for fd in (self.start_fd, self.info_fd):
                if fd is not None:
                    os.close(fd)
            if self.cgroup is not None:
                self.cgroup.destroy()
        finally:
            if self.host_dir is not None:
                shutil.rmtree(self.host_dir, ignore_errors=True)
            if self.uid is not None and self._uids is not None:
                self._uids.release(self.uid)
