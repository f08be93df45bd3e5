"""What a vLLM engine killed with SIGKILL leaves (its IPC ledger and the shared-memory segments and
semaphores in it) is released by the next engine started on the host; a live engine's is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing import resource_tracker, shared_memory

from megatron_rlhf.rollout.vllm_plugin import LEDGER_PREFIX, LEDGER_SUFFIX, release_orphaned_ledgers


def _segment() -> str:
    """A real POSIX shared-memory segment left behind as a killed process leaves it: on disk,
    unmapped, not tracked by this process."""
    segment = shared_memory.SharedMemory(create=True, size=64)
    name = segment._name  # "/psm_..." as the resource tracker records it
    resource_tracker.unregister(name, "shared_memory")
    segment.close()
    return name


def _ledger(directory, pid: int, lines: list[str]) -> str:
    path = os.path.join(directory, f"{LEDGER_PREFIX}{pid}_test{LEDGER_SUFFIX}")
    with open(path, "w", encoding="utf-8") as ledger:
        ledger.write("".join(line + "\n" for line in lines))
    return path


def test_ledgers_of_dead_engines_are_released_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leaked, released_by_owner, live_segment = _segment(), _segment(), _segment()
    orphan = _ledger(tmp_path, dead.pid, [f"+ shared_memory {leaked}", f"+ shared_memory {released_by_owner}",
                                          f"- shared_memory {released_by_owner}", "+ shared_memory /psm_gone_already"])
    live = _ledger(tmp_path, os.getpid(), [f"+ shared_memory {live_segment}"])
    try:
        released = release_orphaned_ledgers(str(tmp_path))
        assert sorted(released) == sorted([leaked, "/psm_gone_already"])
        assert not os.path.exists(orphan) and not os.path.exists("/dev/shm" + leaked)
        # the one its process unregistered itself is not the ledger's to remove
        assert os.path.exists("/dev/shm" + released_by_owner)
        assert os.path.exists(live) and os.path.exists("/dev/shm" + live_segment)
        assert release_orphaned_ledgers(str(tmp_path)) == []
    finally:
        for name in (leaked, released_by_owner, live_segment):
            if os.path.exists("/dev/shm" + name):
                os.unlink("/dev/shm" + name)


def test_a_released_ledger_is_never_written_again(tmp_path):
    """A process whose plugin hooks outlive its engine's ledger (once the process that started an
    engine; now vLLM's own processes only) must not bring the removed file back with a later lock
    (it did: a ledger of released names was left after every demo that scored with the reward
    model after RL)."""
    from megatron_rlhf.rollout.vllm_plugin import _append

    path = _ledger(tmp_path, os.getpid(), ["+ semaphore /mp-a"])
    _append(path, "- semaphore /mp-a")
    with open(path, encoding="utf-8") as ledger:
        assert ledger.read().splitlines() == ["+ semaphore /mp-a", "- semaphore /mp-a"]
    os.unlink(path)
    _append(path, "+ semaphore /mp-b")
    assert not os.path.exists(path)


def _record_and_make_a_segment() -> None:
    from megatron_rlhf.rollout.vllm_plugin import record_ipc_names

    record_ipc_names()
    segment = shared_memory.SharedMemory(create=True, size=64)
    segment.close()
    segment.unlink()


def test_only_vllms_own_processes_write_the_ledger(tmp_path, monkeypatch):
    """The process that starts an engine (or holds it in-process) loads the plugin while the
    ledger's variable is set; its own objects stay out of the ledger (an engine's shutdown would
    otherwise unlink what that process still uses). vLLM's engine-core and worker processes record."""
    import multiprocessing

    from megatron_rlhf.rollout.vllm_plugin import IPC_LEDGER_ENV

    results = {}
    for name in ("RankProcess-1", "EngineCore_DP0"):
        path = _ledger(tmp_path, os.getpid(), [])
        monkeypatch.setenv(IPC_LEDGER_ENV, path)
        child = multiprocessing.get_context("spawn").Process(target=_record_and_make_a_segment, name=name)
        child.start()
        child.join(60)
        assert child.exitcode == 0
        with open(path, encoding="utf-8") as ledger:
            results[name] = [line.split()[0] for line in ledger.read().splitlines()]
        os.unlink(path)
    script = ("from tests.unit.test_ipc_ledger import _record_and_make_a_segment as f; f()")
    path = _ledger(tmp_path, os.getpid(), [])
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, IPC_LEDGER_ENV: path})
    with open(path, encoding="utf-8") as ledger:
        results["top-level"] = ledger.read().splitlines()
    assert results == {"RankProcess-1": [], "EngineCore_DP0": ["+", "-"], "top-level": []}
