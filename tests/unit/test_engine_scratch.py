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


def test_torch_compile_cache_is_the_users_own_and_survives_removal(tmp_path, monkeypatch):
    """vLLM's sampler compiles at an engine's first generation; inductor keeps its precompiled
    header under ``$TMPDIR/torchinductor_<user>`` whatever TORCHINDUCTOR_CACHE_DIR says, so the
    scratch folder links that name to the user's cache (an empty one cost 6-9 s per engine)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    shared = default_cache_dir()
    scratch = EngineScratch(str(tmp_path))
    link = scratch.path / os.path.basename(shared)
    assert link.is_symlink() and os.path.realpath(link) == os.path.realpath(shared)
    assert scratch.variables()["TORCHINDUCTOR_CACHE_DIR"] == shared
    with scratch.environment():
        child = subprocess.run([sys.executable, "-c", "from torch._inductor.runtime.cache_dir_utils import "
                                "default_cache_dir; import os; print(os.path.realpath(default_cache_dir()))"],
                               capture_output=True, text=True, check=True)
    assert child.stdout.strip() == os.path.realpath(shared)  # an engine's process finds the user's cache
    kept = link / f"kept_{os.getpid()}"
    kept.write_text("compiled")
    try:
        scratch.remove()
        assert not scratch.path.exists() and os.path.exists(os.path.join(shared, kept.name))
    finally:
        os.remove(os.path.join(shared, kept.name))


def test_a_users_compile_cache_setting_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert "TORCHINDUCTOR_CACHE_DIR" not in EngineScratch(str(tmp_path)).variables()
