"""Shared, real reward components for the reward tests, and the leftover checks they all rely on.

The sandbox, the code verifier and the math verifier are built once per session (a math-verify
worker imports sympy once) and are the real ones: bubblewrap, seccomp, cgroups, rlimits. At the end
of the session no sandboxed process of this session may be alive and no execution cgroup may
remain. Other processes may run sandboxes on the host meanwhile (tests in a parallel xdist worker,
a trainer): :func:`sandboxed_processes` leaves out the processes of their live executions.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_rlhf.rewards.sandbox.config import SandboxConfig
from megatron_rlhf.rewards.sandbox.executor import Sandbox
from megatron_rlhf.rewards.sandbox.isolation import MARKER_VARIABLE
from megatron_rlhf.rewards.sandbox.process import UID_RANGE, uid_held_elsewhere


def sandboxed_processes(config: SandboxConfig | None = None, *, include_live_elsewhere: bool = False) -> list[str]:
    """'pid: why' for every live process that belongs to a sandbox (marker or sandbox uid).

    Unless ``include_live_elsewhere``, the processes of executions that another live process on
    the host is running are left out: a dedicated uid whose lock that process holds
    (:class:`~megatron_rlhf.rewards.sandbox.process.UidPool`), or, without dedicated uids, a
    marker naming a live owner other than this process (execution names end ``-<owner pid>-<n>``).
    What is left is this process's executions and what outlived its execution."""
    config = config or SandboxConfig()
    low, high = config.sandbox_uid_base, config.sandbox_uid_base + UID_RANGE
    marker = f"{MARKER_VARIABLE}=".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        has_uid = low <= uid < high
        names = [item[len(marker):].decode(errors="replace") for item in environ.split(b"\0") if item.startswith(marker)]
        if not has_uid and not names:
            continue
        if not include_live_elsewhere:
            if has_uid and uid_held_elsewhere(uid):
                continue
            if not has_uid and _owner_lives_elsewhere(names[0]):
                continue
        found.append(f"{entry.name}: uid {uid}, {status.splitlines()[0]}")
    return found


def _owner_lives_elsewhere(execution_name: str) -> bool:
    parts = execution_name.rsplit("-", 2)  # mrlhf-sbx-<owner pid>-<n> (Sandbox.start)
    owner = parts[1] if len(parts) == 3 else ""
    if not owner.isdigit() or int(owner) == os.getpid():
        return False
    return Path(f"/proc/{owner}").exists()


def execution_cgroups(sandbox: Sandbox) -> list[str]:
    """Execution cgroups (``<owner pid>-<n>``) of this process or of owners that are gone; those of
    other live processes (a parallel test worker's executions) are theirs to remove."""
    backend = sandbox.plan.cgroups
    if backend is None:
        return []
    return [str(d) for parent in backend.parents for d in parent.iterdir()
            if d.is_dir() and not _owner_lives_elsewhere(f"-{d.name}")]


@pytest.fixture(scope="session")
def sandbox() -> Sandbox:
    with Sandbox(SandboxConfig()) as shared:
        yield shared
        assert sandboxed_processes() == [], "sandboxed processes outlived the session"
        assert execution_cgroups(shared) == [], "execution cgroups left behind"


@pytest.fixture(scope="session")
def code_verifier(sandbox: Sandbox):
    from megatron_rlhf.rewards.verifiers.code_verifier import CodeVerifier, CodeVerifierConfig

    verifier = CodeVerifier(CodeVerifierConfig(), sandbox=sandbox)
    yield verifier
    verifier.close()


@pytest.fixture(scope="session")
def math_verifier(sandbox: Sandbox):
    from megatron_rlhf.rewards.verifiers.math_verifier import MathVerifier, MathVerifierConfig

    verifier = MathVerifier(MathVerifierConfig(), sandbox=sandbox)
    yield verifier
    verifier.close()
