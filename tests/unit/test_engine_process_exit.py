"""rollout/engine_process_exit.py: vLLM's spawned processes end with os._exit after the atexit
handlers, with the exit status Python would give; every other process ends as Python ends it.

Real ``multiprocessing`` spawn children named as vLLM names its processes (and one not), each
recording whether the fast exit was installed, whether its atexit handler ran and whether an
object alive at exit was finalised (only interpreter finalisation does that)."""

from __future__ import annotations

import atexit
import multiprocessing
import os
from pathlib import Path

import pytest

from megatron_rlhf.rollout.engine_process_exit import FAST_EXIT_ENV, fast_exit_enabled

_ALIVE_AT_EXIT = []


class _Finalised:
    def __init__(self, path: str):
        self.path = path

    def __del__(self):
        Path(self.path).write_text("finalised")


def _child(folder: str, ending: str) -> None:
    from megatron_rlhf.rollout.engine_process_exit import apply_fast_exit

    Path(folder, "installed").write_text(str(apply_fast_exit()))
    atexit.register(lambda: Path(folder, "atexit").write_text("ran"))
    _ALIVE_AT_EXIT.append(_Finalised(os.path.join(folder, "finalised")))
    if ending == "raise":
        raise RuntimeError("the process's function failed")
    if ending == "exit3":
        import sys

        sys.exit(3)  # the function's own exit: Python's, then spawn_main passes the status on


def _run(tmp_path: Path, name: str, ending: str = "return") -> tuple[int, dict[str, str]]:
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(str(tmp_path), ending), name=name)
    process.start()
    process.join(120)
    seen = {path.name: path.read_text() for path in tmp_path.iterdir()}
    return process.exitcode, seen


@pytest.mark.parametrize("name", ["EngineCore_DP0", "VllmWorker-0"])
def test_vllm_processes_skip_finalisation_and_keep_atexit_and_status(tmp_path, name):
    status, seen = _run(tmp_path, name)
    assert status == 0
    assert seen == {"installed": "True", "atexit": "ran"}  # no "finalised": the interpreter was not torn down


@pytest.mark.parametrize(("ending", "expected"), [("raise", 1), ("exit3", 3)])
def test_a_failed_vllm_process_keeps_its_exit_status(tmp_path, ending, expected):
    status, seen = _run(tmp_path, "EngineCore_DP0", ending)
    assert status == expected
    assert seen == {"installed": "True", "atexit": "ran"}


def test_other_processes_end_as_python_ends_them(tmp_path):
    status, seen = _run(tmp_path, "SpawnProcess-7")
    assert status == 0
    assert seen == {"installed": "False", "atexit": "ran", "finalised": "finalised"}


def test_the_variable_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv(FAST_EXIT_ENV, "0")  # spawn children inherit the environment
    status, seen = _run(tmp_path, "EngineCore_DP0")
    assert status == 0
    assert seen == {"installed": "False", "atexit": "ran", "finalised": "finalised"}


def test_the_calling_process_is_never_changed():
    import sys

    from megatron_rlhf.rollout.engine_process_exit import apply_fast_exit

    assert apply_fast_exit() is False  # pytest's own process has no multiprocessing parent
    assert getattr(sys.exit, "fast_exit_of", None) is None


def test_only_0_and_1_are_accepted_and_the_error_names_the_variable():
    assert fast_exit_enabled(None) is True and fast_exit_enabled("1") is True and fast_exit_enabled(" 0 ") is False
    with pytest.raises(ValueError, match=f"{FAST_EXIT_ENV}='off': must be 0"):
        fast_exit_enabled("off")
