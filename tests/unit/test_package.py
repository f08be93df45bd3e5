"""The package imports cheaply without optional backends, and the CLI keeps its contract.

Import checks run in a fresh interpreter (a subprocess), where `sys.modules` shows exactly what
`import megatron_rlhf` pulled in. The CLI contract tests (exit codes, the `verify` output line,
argument mapping) run `cli.main` in-process with stand-in library functions: the CLI is what is
under test here, the checkpoint library has its own tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from megatron_rlhf import cli

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBCOMMANDS = (
    "convert-hf", "export-hf", "verify", "check-weight-sync", "conversion-demo", "score", "demo", "train-sft",
    "train-genrm", "train-rm", "label-steps", "eval-bon", "train-rl", "eval", "plan", "study",
)
HEAVY_MODULES = ("torch", "megatron", "transformers", "vllm", "ray", "transformer_engine")
BLOCKED_BACKENDS = ("vllm", "ray", "transformer_engine")

# Prepended to the child's code: makes the optional backends unimportable even where they are
# installed, and checks that the block works before anything else runs.
_BLOCKER = f"""
import importlib.abc, json, sys

class _BlockBackends(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED_BACKENDS!r}:
            raise ImportError(f"{{name}} is blocked in this test")
        return None

sys.meta_path.insert(0, _BlockBackends())
for _backend in {BLOCKED_BACKENDS!r}:
    try:
        __import__(_backend)
    except ImportError:
        pass
    else:
        raise SystemExit(f"blocker failed: {{_backend}} imported")

def loaded_heavy_modules():
    return sorted(
        name for name in sys.modules if name.split(".")[0] in {HEAVY_MODULES!r}
    )
"""


def _run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_works_without_vllm_ray_or_transformer_engine() -> None:
    child = _run_child("import megatron_rlhf\nprint(megatron_rlhf.__version__)")
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip()


def test_import_loads_no_heavy_module() -> None:
    child = _run_child("import megatron_rlhf\nprint(json.dumps(loaded_heavy_modules()))")
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == []


def _after_top_level_help(report: str) -> object:
    """``report`` (a Python expression) evaluated in a fresh interpreter after ``megatron-rlhf --help``."""
    child = _run_child(
        "from megatron_rlhf import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps({report}))"
    )
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout.splitlines()[-1])


def test_cli_help_loads_no_heavy_module() -> None:
    assert _after_top_level_help("loaded_heavy_modules()") == []


def test_cli_help_imports_no_command_module() -> None:
    """The top-level parser is built from the Command records alone: a command's module is
    imported only when that command is parsed."""
    assert _after_top_level_help("sorted(name for name in sys.modules if name.startswith('megatron_rlhf.cli.'))") == []


def test_every_command_help_loads_no_heavy_module() -> None:
    child = _run_child(
        "from megatron_rlhf import cli\n"
        "for command in cli.COMMANDS:\n"
        "    try:\n"
        "        cli.main([command.name, '--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (command.name, exit.code)\n"
        "print(json.dumps(loaded_heavy_modules()))"
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout.splitlines()[-1]) == []


def test_every_command_module_has_add_arguments_and_run() -> None:
    assert [command.name for command in cli.COMMANDS] == list(SUBCOMMANDS)
    for command in cli.COMMANDS:
        module = command.load()
        assert module.__name__.startswith("megatron_rlhf.cli."), command
        assert callable(module.add_arguments) and callable(module.run), command


def test_help_lists_every_subcommand() -> None:
    child = subprocess.run(
        [sys.executable, "-m", "megatron_rlhf", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    for name in SUBCOMMANDS:
        assert name in child.stdout, f"{name!r} missing from --help:\n{child.stdout}"


# --- CLI contract, with stand-in library modules ---------------------------------------------


@pytest.fixture(autouse=True)
def _restore_pythonwarnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.main adds filters to PYTHONWARNINGS for the ranks it starts; undo it after each test."""
    monkeypatch.setenv("PYTHONWARNINGS", "")


def _install_fake_module(
    monkeypatch: pytest.MonkeyPatch, name: str, **attributes: object
) -> None:
    module = types.ModuleType(name)
    for attribute, value in attributes.items():
        setattr(module, attribute, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_convert_hf_passes_the_parallel_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def hf_to_megatron(
        hf_dir, out_dir, tensor_parallel, pipeline_parallel, expert_parallel=1, overwrite=False
    ):
        calls.append(
            (hf_dir, out_dir, tensor_parallel, pipeline_parallel, expert_parallel, overwrite)
        )

    _install_fake_module(
        monkeypatch, "megatron_rlhf.checkpoint.convert", hf_to_megatron=hf_to_megatron
    )
    code = cli.main(["convert-hf", "--hf", "in", "--out", "out", "--tp", "2", "--pp", "4"])
    assert code == 0
    assert calls == [("in", "out", 2, 4, 1, False)]


def _verification_failed() -> type[Exception]:
    """The library's real exception: the CLI must read what it really carries."""
    from megatron_rlhf.checkpoint.verify import VerificationFailed

    return VerificationFailed


def test_verify_prints_the_difference_last_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _install_fake_module(
        monkeypatch,
        "megatron_rlhf.checkpoint.verify",
        VerificationFailed=_verification_failed(),
        verify_checkpoint=lambda hf_dir, ckpt_dir, tolerance=None, seed=0: 2.5e-06,
    )
    code = cli.main(["verify", "--hf", "hf", "--ckpt", "ckpt"])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[-1] == "max_abs_logit_diff=2.5e-06"


def test_verify_above_tolerance_exits_1_with_the_difference_last(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    verification_failed = _verification_failed()

    def verify_checkpoint(hf_dir, ckpt_dir, tolerance=None, seed=0):
        raise verification_failed(0.5, tolerance)

    _install_fake_module(
        monkeypatch,
        "megatron_rlhf.checkpoint.verify",
        VerificationFailed=verification_failed,
        verify_checkpoint=verify_checkpoint,
    )
    code = cli.main(["verify", "--hf", "hf", "--ckpt", "ckpt", "--tolerance", "1e-4"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.splitlines()[-1] == "max_abs_logit_diff=0.5"
    assert captured.err.startswith("error: ")


def test_user_error_exits_2_with_a_message_and_no_traceback(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The real converter: a missing checkpoint is refused before any process starts.
    missing = tmp_path / "missing"
    code = cli.main(["export-hf", "--ckpt", str(missing), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: {missing}: checkpoint directory not found\n"
    assert not (tmp_path / "out").exists()
