"""The sandbox refuses to run with less isolation than its config asks for, runs with less only on
an explicit opt-out, and keeps its other promises (start signal, codec, seccomp table)."""

from __future__ import annotations

import os
import tempfile

import pytest

from megatron_rlhf.rewards.sample import Verdict
from megatron_rlhf.rewards.sandbox.config import ExecutionLimits, SandboxConfig
from megatron_rlhf.rewards.sandbox.executor import Sandbox
from megatron_rlhf.rewards.sandbox.isolation import WORKDIR, SandboxUnavailable
from megatron_rlhf.rewards.sandbox.process import ExecutionRequest
from megatron_rlhf.rewards.verifiers.harness import value_codec


def test_missing_bubblewrap_is_refused() -> None:
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        Sandbox(SandboxConfig(bwrap_executable="no-such-bwrap"))


def test_unreadable_interpreter_is_refused() -> None:
    with pytest.raises(SandboxUnavailable, match="no Python interpreter starts inside the sandbox"):
        Sandbox(SandboxConfig(python_executable="/nonexistent/python3"))


def test_seccomp_without_namespaces_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="seccomp"):
        SandboxConfig(namespaces=False)


def test_bad_limits_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_processes"):
        ExecutionLimits(max_processes=0)


def test_explicit_opt_out_runs_with_rlimits_and_cleans_up(monkeypatch) -> None:
    # A private temporary directory (other processes write to /tmp meanwhile), open to the
    # unprivileged user the execution runs as, like /tmp.
    private = tempfile.mkdtemp(prefix="sandbox-cleanup-")
    os.chmod(private, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", private)
    try:
        _run_unisolated_and_check_cleanup()
    finally:
        os.rmdir(private)  # fails (and the test with it) if anything was left inside


def _run_unisolated_and_check_cleanup() -> None:
    before = set(os.listdir(tempfile.gettempdir()))
    with Sandbox(SandboxConfig(namespaces=False, seccomp=False)) as unisolated:
        result = unisolated.run(ExecutionRequest(
            unisolated.python_command(f"{WORKDIR}/main.py"),
            files={"main.py": b"import os\nopen('scratch', 'w').write('x')\nprint(os.getcwd() != '/')"},
        ))
        spin = unisolated.run(ExecutionRequest(
            unisolated.python_command(f"{WORKDIR}/main.py"), files={"main.py": b"while True: pass"},
            limits=ExecutionLimits(wall_seconds=5, cpu_seconds=1),
        ))
    assert result.verdict is Verdict.OK and result.stdout.strip() == b"True"
    assert spin.verdict is Verdict.TIME_LIMIT
    assert set(os.listdir(tempfile.gettempdir())) - before == set()


def test_program_cannot_fake_a_sandbox_failure(sandbox) -> None:
    result = sandbox.run(ExecutionRequest(
        sandbox.python_command(f"{WORKDIR}/main.py"),
        files={"main.py": b"import sys\nsys.stderr.write('bwrap: setting up uid map: Permission denied\\n')\nsys.exit(1)"},
    ))
    assert result.verdict is Verdict.RUNTIME_ERROR


def test_stdin_is_delivered_and_large_inputs_do_not_deadlock(sandbox) -> None:
    payload = b"x" * (4 * 1024 * 1024)
    result = sandbox.run(ExecutionRequest(
        sandbox.python_command(f"{WORKDIR}/main.py"),
        files={"main.py": b"import sys\nprint(len(sys.stdin.buffer.read()))"}, stdin=payload,
    ))
    assert result.verdict is Verdict.OK and int(result.stdout) == len(payload)


def test_seccomp_table_resolves_on_this_machine() -> None:
    import pyseccomp

    from megatron_rlhf.rewards.sandbox.seccomp_policy import DENIED_SYSCALLS

    if os.uname().machine != "x86_64":
        pytest.skip("the deny list is checked against x86-64 syscall names")
    assert [n for n in DENIED_SYSCALLS if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, n) < 0] == []


@pytest.mark.parametrize("value", [None, True, 3, 2**80, -0.0, float("inf"), "é", b"\x00", (1, [2]), {"a": {1, 2}},
                                   frozenset({1}), 1 + 2j, [[[]]]])
def test_codec_round_trips_plain_values(value) -> None:
    decoded = value_codec.decode(value_codec.loads_message(value_codec.dumps_message({"v": value_codec.encode(value)}))["v"])
    assert decoded == value and type(decoded) is type(value)


def test_codec_turns_foreign_objects_into_opaque_values() -> None:
    class Liar(list):
        def __eq__(self, other):
            return True

    decoded = value_codec.decode(value_codec.encode(Liar([1])))
    assert decoded != [1] and not (decoded == decoded.__class__("Liar"))
    with pytest.raises(value_codec.CodecError):
        value_codec.decode({"dict": [[[1], 2]]})  # unhashable key
