"""Adversarial suite: 100+ hostile programs through the real sandbox (bubblewrap, seccomp, cgroups).

All programs run once, in parallel through ``Sandbox.run_many``, with short limits (1.5 s wall,
1 s CPU); each then gets its own test: verdict as expected and no ``ESCAPED`` in its output. The
host is checked too: a sentinel process the programs try to kill is alive, a sentinel file they
try to write is unchanged, the loopback listener they try to reach accepted nothing, no file
appeared where they tried to write, and no sandboxed process or execution cgroup is left.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from megatron_rlhf.rewards.sandbox.cgroups import CgroupBackend
from megatron_rlhf.rewards.sandbox.config import ExecutionLimits, SandboxConfig
from megatron_rlhf.rewards.sandbox.isolation import WORKDIR
from megatron_rlhf.rewards.sandbox.process import ExecutionRequest
from tests.unit.rewards.adversarial_programs import ALL_PROGRAMS, Program
from tests.unit.rewards.conftest import execution_cgroups, sandboxed_processes

LIMITS = ExecutionLimits(wall_seconds=1.5, cpu_seconds=1, memory_bytes=512 * 1024**2, max_processes=32)
SENTINEL_TEXT = b"untouched\n"


class Host:
    """What the programs attack on the host side."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(8)
        self.secret_name = f"MRLHF_SECRET_{self.token.upper()}"
        os.environ[self.secret_name] = "do-not-leak"
        self.directory = tempfile.mkdtemp(prefix="mrlhf-adversarial-")
        self.sentinel_file = Path(self.directory) / "sentinel.txt"
        self.sentinel_file.write_bytes(SENTINEL_TEXT)
        self.sentinel = subprocess.Popen(["sleep", "600"])
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.abstract_name = f"mrlhf-{self.token}"
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind("\0" + self.abstract_name)
        self.abstract.listen(16)
        self.abstract.setblocking(False)

    def fill(self, program: Program) -> str:
        replacements = {
            "{token}": self.token, "{port}": str(self.port), "{sentinel_pid}": str(self.sentinel.pid),
            "{sentinel_file}": str(self.sentinel_file), "{abstract_socket}": self.abstract_name,
            "{secret_name}": self.secret_name,
        }
        code = program.code
        for placeholder, value in replacements.items():
            code = code.replace(placeholder, value)
        return code

    def accepted_connections(self) -> int:
        count = 0
        for listener in (self.listener, self.abstract):
            while True:
                try:
                    connection, _ = listener.accept()
                except BlockingIOError:
                    break
                connection.close()
                count += 1
        return count

    def close(self) -> None:
        os.environ.pop(self.secret_name, None)
        self.sentinel.kill()
        self.sentinel.wait()
        self.listener.close()
        self.abstract.close()
        for path in Path(self.directory).iterdir():
            path.unlink()
        os.rmdir(self.directory)


@pytest.fixture(scope="module")
def host():
    attacked = Host()
    yield attacked
    attacked.close()


@pytest.fixture(scope="module")
def already_running(sandbox) -> tuple[set[str], set[str]]:
    """Sandboxed processes and cgroups of long-lived executions (another test's math worker)
    that exist before this module runs; this module's own may not outlive it."""
    return set(sandboxed_processes()), set(execution_cgroups(sandbox))


@pytest.fixture(scope="module")
def outcomes(sandbox, host, already_running):
    requests = [
        ExecutionRequest(
            command=sandbox.python_command(f"{WORKDIR}/main.py"),
            files={"main.py": host.fill(program).encode()},
            limits=dataclasses.replace(LIMITS, wall_seconds=program.wall_seconds or LIMITS.wall_seconds),
        )
        for program in ALL_PROGRAMS
    ]
    results = sandbox.run_many(requests)
    return {program.name: result for program, result in zip(ALL_PROGRAMS, results)}


def test_suite_is_large_and_names_are_unique() -> None:
    names = [program.name for program in ALL_PROGRAMS]
    assert len(names) >= 100
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("program", ALL_PROGRAMS, ids=lambda program: program.name)
def test_program_is_contained(program: Program, outcomes) -> None:
    result = outcomes[program.name]
    output = (result.stdout + result.stderr).decode("utf-8", "replace")
    assert "ESCAPED" not in output, output[-2000:]
    assert result.verdict in program.verdicts, (result.verdict, result.detail, output[-1500:])


def test_host_is_untouched(outcomes, host, sandbox) -> None:
    assert host.sentinel.poll() is None, "the sentinel process was killed"
    assert host.sentinel_file.read_bytes() == SENTINEL_TEXT
    assert host.accepted_connections() == 0
    assert sorted(os.listdir(host.directory)) == ["sentinel.txt"]
    for target in ("/usr", "/", "/etc", "/tmp", "/var/tmp", "/dev", "/dev/shm", "/usr/lib"):
        leaked = [name for name in os.listdir(target) if host.token in name]
        assert leaked == [], f"{target} got {leaked}"


def test_nothing_left_behind(outcomes, sandbox, already_running) -> None:
    # Teardown is synchronous (the sandbox's PID-namespace init is watched to its end and the
    # cgroup emptied), so nothing may be left once run_many has returned.
    processes, cgroups = already_running
    assert set(sandboxed_processes(sandbox.config)) - processes == set()
    assert set(execution_cgroups(sandbox)) - cgroups == set()


def test_process_limit_is_the_configured_one(sandbox) -> None:
    limits = ExecutionLimits(wall_seconds=5.0, max_processes=8)
    code = (
        "import os, time\nn = 0\nwhile True:\n    try: pid = os.fork()\n    except OSError: break\n"
        "    if pid == 0:\n        time.sleep(30); os._exit(0)\n    n += 1\nprint(n)"
    )
    result = sandbox.run(ExecutionRequest(sandbox.python_command(f"{WORKDIR}/main.py"),
                                          files={"main.py": code.encode()}, limits=limits))
    assert result.verdict.value == "ok", result.stderr
    assert 0 < int(result.stdout) < 8


def test_killed_trainer_leaves_no_sandbox_behind(tmp_path: Path, already_running) -> None:
    """SIGKILL the process that owns a running sandbox: bubblewrap's parent-death signal and the
    PID namespace take every sandboxed process with it."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, threading\n"
        "from megatron_rlhf.rewards.sandbox.config import SandboxConfig, ExecutionLimits\n"
        "from megatron_rlhf.rewards.sandbox.executor import Sandbox\n"
        "from megatron_rlhf.rewards.sandbox.isolation import WORKDIR\n"
        "from megatron_rlhf.rewards.sandbox.process import ExecutionRequest\n"
        "box = Sandbox(SandboxConfig())\n"
        "code = b'import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(600)\\nprint(\"up\", flush=True)\\ntime.sleep(600)'\n"
        "process = box.start(ExecutionRequest(box.python_command(f'{WORKDIR}/main.py'), files={'main.py': code},"
        " limits=ExecutionLimits(wall_seconds=600, cpu_seconds=600)))\n"
        "import os\nprint(os.read(process.stdout_fd, 100).decode().strip(), flush=True)\n"
        "threading.Event().wait()\n"
    )
    owner = subprocess.Popen([os.sys.executable, str(script)], stdout=subprocess.PIPE, cwd=Path(__file__).parents[3])
    assert owner.stdout.readline().strip() == b"up"
    processes, _ = already_running
    assert set(sandboxed_processes(include_live_elsewhere=True)) - processes != set()  # the owner's execution
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 30  # a bound for the kernel's teardown, not a speed assertion
    while set(sandboxed_processes()) - processes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(sandboxed_processes()) - processes == set()
    # The dead owner's execution cgroup is removed by the next backend to start.
    backend = CgroupBackend(SandboxConfig().cgroup_parent)
    stale = [d.name for parent in backend.parents for d in parent.iterdir() if d.name.startswith(f"{owner.pid}-")]
    assert stale == []
