"""The engine's private temporary folder: variables redirected only while vLLM starts, the folder
removed at shutdown, and the folders of dead engines (and only those) swept at the next start."""

from __future__ import annotations

import os
import subprocess
import sys

from megatron_rlhf.rollout.engine_scratch import REDIRECTED, SCRATCH_PREFIX, EngineScratch, remove_orphaned_scratch


def test_environment_points_into_the_folder_and_is_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", "/users/own/tmp")
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    scratch = EngineScratch(str(tmp_path))
    assert scratch.path.parent == tmp_path and scratch.path.name.startswith(f"{SCRATCH_PREFIX}{os.getpid()}_")
    with scratch.environment():
        assert all(os.environ[name] == str(scratch.path) for name in REDIRECTED)
        child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == str(scratch.path)  # a process started here writes inside
    assert os.environ["TMPDIR"] == "/users/own/tmp" and "VLLM_RPC_BASE_PATH" not in os.environ


def test_environment_is_restored_when_the_start_fails(tmp_path, monkeypatch):
    monkeypatch.delenv("TMPDIR", raising=False)
    scratch = EngineScratch(str(tmp_path))
    try:
        with scratch.environment():
            raise RuntimeError("engine failed to start")
    except RuntimeError:
        pass
    assert "TMPDIR" not in os.environ


def test_remove_deletes_what_the_engine_left(tmp_path):
    scratch = EngineScratch(str(tmp_path))
    (scratch.path / "0b5c-socket").write_text("")
    (scratch.path / "vllm_dist_abc").mkdir()
    scratch.remove()
    scratch.remove()  # idempotent
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_only_the_folders_of_dead_engines(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{SCRATCH_PREFIX}{dead.pid}_x1"
    live = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}_x2"
    unrelated = tmp_path / "megatron_rlhf_other_1_x3"
    odd = tmp_path / f"{SCRATCH_PREFIX}notapid_x4"
    for folder in (orphan, live, unrelated, odd):
        folder.mkdir()
        (folder / "sock").write_text("")
    assert remove_orphaned_scratch(str(tmp_path)) == [str(orphan)]
    assert not orphan.exists() and live.exists() and unrelated.exists() and odd.exists()
