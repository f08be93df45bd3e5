"""Typed configuration of the code sandbox: resource limits and the isolation a run requires.

Every isolation layer is *required* by default. A layer that is asked for and not available on the
machine makes the sandbox refuse to start (:class:`~megatron_rlhf.rewards.sandbox.isolation.SandboxUnavailable`);
running with less isolation takes an explicit ``False`` in the config, which is logged as a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass(frozen=True)
class ExecutionLimits:
    """Hard limits of one execution. The untrusted code cannot raise any of them."""

    wall_seconds: float = 10.0
    """Wall-clock limit of the whole execution, enforced by the parent (kill of the sandbox). > 0."""
    cpu_seconds: int = 10
    """CPU seconds per process (RLIMIT_CPU; SIGXCPU at the limit, SIGKILL one second later). >= 1."""
    memory_bytes: int = 512 * MIB
    """Memory of the whole execution (cgroup memory limit, swap included) and the address space
    of each process (RLIMIT_AS). >= 64 MiB."""
    max_processes: int = 32
    """Processes and threads of the whole execution (cgroup pids.max; also RLIMIT_NPROC when the
    sandbox runs under a dedicated uid). >= 4."""
    max_file_bytes: int = 16 * MIB
    """Largest file a process may write (RLIMIT_FSIZE). >= 0."""
    scratch_bytes: int = 32 * MIB
    """Size of the private working directory (a tmpfs), all files together. >= 1 MiB."""
    max_open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE). >= 16."""
    max_output_bytes: int = 1 * MIB
    """stdout and stderr together, read by the parent; past it the execution is killed with
    verdict output limit. >= 1."""

    def __post_init__(self) -> None:
        _check_at_least("wall_seconds", self.wall_seconds, 1e-3, number=True)
        _check_at_least("cpu_seconds", self.cpu_seconds, 1)
        _check_at_least("memory_bytes", self.memory_bytes, 64 * MIB)
        _check_at_least("max_processes", self.max_processes, 4)
        _check_at_least("max_file_bytes", self.max_file_bytes, 0)
        _check_at_least("scratch_bytes", self.scratch_bytes, 1 * MIB)
        _check_at_least("max_open_files", self.max_open_files, 16)
        _check_at_least("max_output_bytes", self.max_output_bytes, 1)


@dataclass(frozen=True)
class SandboxConfig:
    """Where and how untrusted code runs."""

    limits: ExecutionLimits = field(default_factory=ExecutionLimits)
    """Default limits of an execution (a request may bring its own)."""
    max_concurrency: int = 2
    """Executions run in parallel by :meth:`Sandbox.run_many`. >= 1."""
    namespaces: bool = True
    """Run inside bubblewrap: new user, PID, network, mount, IPC, UTS and cgroup namespaces; the
    file system read-only (only /usr and the interpreter visible), a private tmpfs as working
    directory. False runs the code as a plain child process with rlimits only (no file-system,
    network or process isolation): an explicit opt-out for machines without user namespaces."""
    seccomp: bool = True
    """Load a seccomp filter (ptrace, mount, namespaces, kernel keyrings, BPF, perf, io_uring,
    non-Unix sockets, ... denied). Needs ``namespaces`` and the libseccomp library."""
    cgroups: bool = True
    """Put each execution in its own cgroup with a memory limit and a process limit (cgroup v1
    pids+memory hierarchies, or v2 with both controllers delegated)."""
    python_executable: str | None = None
    """Interpreter that runs Python inside the sandbox. None: the trainer's own interpreter if the
    sandbox user can read it, otherwise /usr/bin/python3 (checked by a probe at start-up)."""
    sandbox_uid_base: int = 61000
    """When the trainer runs as root, each execution runs under its own uid from
    [sandbox_uid_base, sandbox_uid_base + 4096): never root, unable to signal other executions,
    and counted by RLIMIT_NPROC on its own. Ignored for non-root trainers. >= 1000."""
    cgroup_parent: str = "megatron_rlhf_sandbox"
    """Name of the cgroup (under each v1 hierarchy, or under the trainer's v2 cgroup's parent)
    that holds the per-execution cgroups."""
    bwrap_executable: str = "bwrap"
    """The bubblewrap binary (Debian package ``bubblewrap``), looked up on PATH."""

    def __post_init__(self) -> None:
        _check_at_least("max_concurrency", self.max_concurrency, 1)
        _check_at_least("sandbox_uid_base", self.sandbox_uid_base, 1000)
        if self.seccomp and not self.namespaces:
            raise ValueError(
                "sandbox.seccomp=True needs sandbox.namespaces=True (the filter is installed by "
                "bubblewrap); set seccomp: false as well to run without namespaces"
            )
        if not self.cgroup_parent or "/" in self.cgroup_parent or self.cgroup_parent in (".", ".."):
            raise ValueError(
                f"sandbox.cgroup_parent must be a plain directory name, got {self.cgroup_parent!r}"
            )


def _check_at_least(name: str, value: float, minimum: float, number: bool = False) -> None:
    allowed = (int, float) if number else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed) or value < minimum:
        kind = "a number" if number else "an integer"
        raise ValueError(f"sandbox limit {name} must be {kind} >= {minimum}, got {value!r}")
