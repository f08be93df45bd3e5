"""Shared, real reward components for the reward tests, and the leftover checks they all rely on.

The sandbox, the code verifier and the math verifier are built once per session (a math-verify
worker imports sympy once) and are the real ones: bubblewrap, seccomp, cgroups, rlimits. At the end
of the session no sandboxed process may be alive and no execution cgroup may remain.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megatron_rlhf.rewards.sandbox.config import SandboxConfig
from megatron_rlhf.rewards.sandbox.executor import Sandbox
from megatron_rlhf.rewards.sandbox.isolation import MARKER_VARIABLE
from megatron_rlhf.rewards.sandbox.process import UID_RANGE


def sandboxed_processes(config: SandboxConfig | None = None) -> list[str]:
    """'pid: why' for every live process that belongs to a sandbox (marker or sandbox uid)."""
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
        if low <= uid < high or marker in environ:
            found.append(f"{entry.name}: uid {uid}, {status.splitlines()[0]}")
    return found


def execution_cgroups(sandbox: Sandbox) -> list[str]:
    backend = sandbox.plan.cgroups
    if backend is None:
        return []
    return [str(d) for parent in backend.parents for d in parent.iterdir() if d.is_dir()]


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
