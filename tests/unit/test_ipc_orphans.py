"""Semaphores that no live process maps (left by runs killed with SIGKILL) are removed; a live
one, mapped by this process, is kept."""

from __future__ import annotations

import os
import sys

import _multiprocessing
import pytest

from megatron_rlhf.parallel.ipc_orphans import SHM_DIR, remove_orphaned_semaphores

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX named semaphores in /dev/shm")

SEMAPHORE = 1  # multiprocessing.synchronize.SEMAPHORE


def _open(name: str):
    """A named semaphore as multiprocessing creates it (``/mp-...``), kept on exit (unlink=False)."""
    return _multiprocessing.SemLock(SEMAPHORE, 1, 1, name, False)


def _file(name: str):
    return SHM_DIR / f"sem.{name[1:]}"


def test_unmapped_semaphores_are_removed_and_mapped_ones_kept():
    orphan, live = f"/mp-test-orphan-{os.getpid()}", f"/mp-test-live-{os.getpid()}"
    semaphore = _open(orphan)
    del semaphore  # closed: what a killed process's semaphore looks like, on disk and mapped by no one
    held = _open(live)
    try:
        assert (_file(orphan)).exists()
        removed = remove_orphaned_semaphores()
        assert _file(orphan).name in removed and not (_file(orphan)).exists()
        assert _file(live).name not in removed and (_file(live)).exists()
        held.acquire()
        held.release()  # still a working semaphore
    finally:
        del held
        for name in (orphan, live):
            if (_file(name)).exists():
                _multiprocessing.sem_unlink(name)
