"""Which isolation tools this machine has, and the command line that puts a program inside them.

A launch is a chain of exec()s, each a real tool, so that nothing runs between fork and exec in
the (multi-threaded) trainer:

``sh`` (joins the execution's cgroup) -> ``setpriv`` (root trainers only: switch to the
execution's own unprivileged uid, drop supplementary groups) -> ``prlimit`` (hard rlimits) ->
``bwrap`` (namespaces, mounts, seccomp) -> ``sh`` inside the sandbox (writes one byte to the
start pipe, closes it) -> the program.

The start byte tells the parent that the sandbox was set up; it is written and its pipe closed
before the untrusted program starts, so the program can neither write it nor pretend that the
sandbox failed (a launch without the byte is an infrastructure error, anything after it is the
program's doing).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from megatron_rlhf.rewards.sandbox.cgroups import CgroupBackend, CgroupsUnavailable, ExecutionCgroup
from megatron_rlhf.rewards.sandbox.config import ExecutionLimits, SandboxConfig
from megatron_rlhf.rewards.sandbox.seccomp_policy import SeccompUnavailable, seccomp_filter_bpf

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SANDBOX_ROOT = "/.sandbox"
"""Top directory of the sandbox's own paths (chosen not to collide with bound host paths)."""
WORKDIR = f"{SANDBOX_ROOT}/work"
"""The private working directory inside the sandbox (a size-limited tmpfs)."""
FILES_DIR = f"{SANDBOX_ROOT}/files"
"""Read-only files given to the execution (harness scripts) inside the sandbox."""
MARKER_VARIABLE = "MEGATRON_RLHF_SANDBOX"
"""Set in every sandboxed process's environment to the execution's name (for leak checks)."""


class SandboxUnavailable(RuntimeError):
    """The isolation the config asks for cannot be had on this machine."""


@dataclass(frozen=True)
class IsolationPlan:
    """What :func:`resolve_isolation` found: tool paths and which layers are on."""

    sh: str
    bash: str
    """Runs the in-sandbox start step (dash cannot close descriptors numbered 10 and above)."""
    prlimit: str
    setpriv: str | None
    """Set when the trainer is root: executions switch to dedicated uids."""
    bwrap: str | None
    """None when namespaces are off (the explicit opt-out)."""
    seccomp_bpf: bytes | None
    cgroups: CgroupBackend | None
    root_entries: tuple[tuple[str, str, str], ...] = field(default=())
    """(kind, source, path): ('symlink', target, path) or ('bind', path, path) for /bin, /lib,
    /lib64, /sbin, as on the host."""

    @property
    def dedicated_uids(self) -> bool:
        return self.setpriv is not None


def _tool(name: str) -> str:
    path = shutil.which(name, path=SYSTEM_PATH) or shutil.which(name)
    if path is None:
        raise SandboxUnavailable(f"{name} not found on PATH ({SYSTEM_PATH})")
    return path


def resolve_isolation(config: SandboxConfig) -> IsolationPlan:
    """Check every layer ``config`` asks for; raise :class:`SandboxUnavailable` naming the first missing one."""
    sh, bash, prlimit = _tool("sh"), _tool("bash"), _tool("prlimit")
    setpriv = _tool("setpriv") if os.geteuid() == 0 else None
    bwrap = None
    if config.namespaces:
        bwrap = shutil.which(config.bwrap_executable, path=SYSTEM_PATH) or shutil.which(
            config.bwrap_executable
        )
        if bwrap is None:
            raise SandboxUnavailable(
                f"sandbox.namespaces=True needs bubblewrap ({config.bwrap_executable!r} not found); "
                "install the Debian package bubblewrap (scripts/bootstrap_env.sh does), or set "
                "sandbox.namespaces: false to run untrusted code without isolation"
            )
        max_userns = _read_int("/proc/sys/user/max_user_namespaces")
        if max_userns == 0:
            raise SandboxUnavailable(
                "user namespaces are disabled (/proc/sys/user/max_user_namespaces is 0); "
                "bubblewrap cannot isolate without them"
            )
    seccomp_bpf = None
    if config.seccomp:
        try:
            seccomp_bpf = seccomp_filter_bpf()
        except SeccompUnavailable as error:
            raise SandboxUnavailable(f"sandbox.seccomp=True: {error}") from error
    cgroups = None
    if config.cgroups:
        try:
            cgroups = CgroupBackend(config.cgroup_parent)
        except (CgroupsUnavailable, OSError) as error:
            raise SandboxUnavailable(f"sandbox.cgroups=True: {error}") from error
    root_entries = []
    for entry in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(entry):
            root_entries.append(("symlink", os.readlink(entry), entry))
        elif os.path.isdir(entry):
            root_entries.append(("bind", entry, entry))
    return IsolationPlan(
        sh=sh,
        bash=bash,
        prlimit=prlimit,
        setpriv=setpriv,
        bwrap=bwrap,
        seccomp_bpf=seccomp_bpf,
        cgroups=cgroups,
        root_entries=tuple(root_entries),
    )


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def interpreter_binds(python_executable: str) -> list[str]:
    """Directories to bind read-only so that ``python_executable`` runs inside the sandbox."""
    real = os.path.realpath(python_executable)
    if real.startswith("/usr/"):
        return []
    prefix = os.path.dirname(os.path.dirname(real))  # <prefix>/bin/python3.X -> <prefix>
    return [prefix]


@dataclass(frozen=True)
class LaunchFiles:
    """Open descriptors the launch passes on: sandbox files (fd, path, mode) and the seccomp program."""

    files: tuple[tuple[int, str, int], ...]
    seccomp_fd: int | None
    start_fd: int
    info_fd: int | None
    """bwrap writes the sandbox init's pid here (namespaces only)."""

    def all_fds(self) -> list[int]:
        fds = [fd for fd, _, _ in self.files] + [self.start_fd]
        return fds + [fd for fd in (self.seccomp_fd, self.info_fd) if fd is not None]


def build_launch_argv(
    plan: IsolationPlan,
    limits: ExecutionLimits,
    uid: int | None,
    cgroup: ExecutionCgroup | None,
    launch_files: LaunchFiles,
    command: list[str],
    ro_binds: list[str],
    execution_name: str,
) -> list[str]:
    """The whole exec chain for one execution (see the module docstring)."""
    procs = [str(path) for path in cgroup.procs_files] if cgroup is not None else []
    join_cgroup = (
        'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; '
        'n=$((n-1)); done; exec "$@"'
    )
    argv = [plan.sh, "-c", join_cgroup, "sandbox-launch", str(len(procs)), *procs]
    if uid is not None:
        assert plan.setpriv is not None
        argv += [plan.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    nproc = [f"--nproc={limits.max_processes}"] if uid is not None else []
    argv += [
        plan.prlimit,
        f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
        f"--as={limits.memory_bytes}",
        f"--fsize={limits.max_file_bytes}",
        f"--nofile={limits.max_open_files}",
        "--core=0",
        *nproc,
        "--",
    ]
    # Inside: signal "started", then close every descriptor the launch passed (the start pipe,
    # the memfds, the seccomp program) before the program runs.
    closes = " ".join(f"{fd}>&-" for fd in launch_files.all_fds())
    started = f'printf s >&{launch_files.start_fd} && exec {closes} && exec "$@"'
    if plan.bwrap is None:
        return argv + [plan.bash, "-c", started, "sandbox-start", *command]
    argv += [
        plan.bwrap,
        "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
        "--die-with-parent", "--new-session", "--hostname", "sandbox",
        # The program is the namespace's init and bwrap's direct child, which bwrap reaps; with
        # bwrap's own reaper as init, that reaper is left to the host's PID 1 to reap, and some
        # PID 1s (this project's CI VMs) reap late, so the zombies would eat into RLIMIT_NPROC.
        "--as-pid-1",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", WORKDIR,
        "--setenv", "TMPDIR", WORKDIR,
        "--setenv", "LC_ALL", "C.UTF-8",
        "--setenv", MARKER_VARIABLE, execution_name,
        "--ro-bind", "/usr", "/usr",
    ]
    if launch_files.info_fd is not None:
        argv += ["--info-fd", str(launch_files.info_fd)]
    for kind, source, target in plan.root_entries:
        argv += ["--symlink", source, target] if kind == "symlink" else ["--ro-bind", source, target]
    for path in ro_binds:
        if path == SANDBOX_ROOT or path.startswith(SANDBOX_ROOT + "/"):
            raise ValueError(f"cannot bind {path!r}: {SANDBOX_ROOT} is reserved for the sandbox")
        argv += ["--ro-bind", path, path]
    argv += [
        "--proc", "/proc",
        "--dev", "/dev", "--remount-ro", "/dev",
        "--size", str(limits.scratch_bytes), "--tmpfs", WORKDIR,
        "--dir", FILES_DIR,
    ]
    for fd, path, mode in launch_files.files:
        argv += ["--perms", f"{mode:04o}", "--file", str(fd), path]
    argv += ["--remount-ro", "/", "--chdir", WORKDIR]
    if launch_files.seccomp_fd is not None:
        argv += ["--seccomp", str(launch_files.seccomp_fd)]
    return argv + ["--", plan.bash, "-c", started, "sandbox-start", *command]
