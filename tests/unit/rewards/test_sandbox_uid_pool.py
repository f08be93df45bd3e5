"""Sandbox uids are held host-wide: two processes' pools never hand out the same uid at once, and
a holder killed with SIGKILL frees its uids (the kernel drops its locks). Real ``flock`` locks
in the real lock folder, on a uid range no sandbox uses (no execution runs here: no root needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megatron_rlhf.rewards.sandbox.process import UidPool, uid_held_elsewhere

BASE = 64000  # far from the default sandbox_uid_base (61000): live sandboxes on the host never use it
HOLDER = """
import sys
from megatron_rlhf.rewards.sandbox.process import UidPool
pool = UidPool({base})
print(pool.acquire(), pool.acquire(), flush=True)
sys.stdin.read()
"""


def _holder() -> tuple[subprocess.Popen, set[int]]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER.format(base=BASE)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[3])
    return process, {int(uid) for uid in process.stdout.readline().split()}


def test_a_uid_another_process_holds_is_skipped_and_freed_when_that_process_is_killed():
    holder, held = _holder()
    try:
        assert len(held) == 2 and all(uid_held_elsewhere(uid) for uid in held)
        pool = UidPool(BASE)
        mine = {pool.acquire() for _ in range(3)}
        assert not mine & held  # the pool went past the other process's uids
        for uid in mine:
            pool.release(uid)
            assert not uid_held_elsewhere(uid)  # released: anyone may take it
    finally:
        holder.kill()
        holder.wait()
    assert not any(uid_held_elsewhere(uid) for uid in held)  # SIGKILL: the kernel dropped the locks
    again = UidPool(BASE)
    assert again.acquire() == BASE


def test_a_pool_reuses_its_own_released_uid_last():
    pool = UidPool(BASE)
    first = pool.acquire()
    pool.release(first)
    second = pool.acquire()
    assert second != first  # round-robin: the released uid waits its turn
    pool.release(second)
