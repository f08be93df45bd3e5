"""What a finished or killed run may leave on the host, for the e2e tests' "nothing is left" checks.

:func:`orphaned_ipc_objects`: shared-memory segments and semaphores no live process maps, and the
IPC ledgers and scratch folders (:mod:`megatron_rlhf.rollout.engine_scratch`) of engines whose
starting process is dead, optionally only those started by ``owners`` (other jobs on a shared
machine start and kill engines of their own meanwhile). A released ledger is never written again
(:func:`megatron_rlhf.rollout.vllm_plugin._append`), so any one of a run that is left is a leak.

:class:`TaggedPids`: every pid that carried a run's tag (an environment variable the run's first
process gets and every process it starts inherits) while the run lasted: who may own what it left.

A segment or semaphore of another live job (tests in a parallel worker process) can be unmapped
for a moment (created and not yet mapped, or closed and not yet unlinked): only what is still
orphaned ``confirm_after_s`` later is reported. A leak does not go away by itself.
"""

from __future__ import annotations

import glob
import os
import tempfile
import threading
import time

TAG_ENV = "MEGATRON_RLHF_TEST_RUN"


def tagged_processes(tag: str) -> list[int]:
    """Pids of the live processes whose environment has ``TAG_ENV=tag``."""
    marker = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if marker in handle.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, ValueError):  # not a process, gone meanwhile, or not ours to read
            continue
    return found


class TaggedPids(threading.Thread):
    """Every pid that carried ``tag`` while the run lasted (polled every ``interval_s``)."""

    def __init__(self, tag: str, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.tag, self.interval_s = tag, interval_s
        self.pids: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            self.pids.update(tagged_processes(self.tag))
            if self.done.wait(self.interval_s):
                return

    def stop(self) -> set[int]:
        """Stop polling; the pids seen."""
        self.done.set()
        self.join()
        return self.pids


def orphaned_ipc_objects(owners: set[int] | None = None, confirm_after_s: float = 2.0) -> set[str]:
    """Paths of what no live process holds (see module docstring)."""
    orphans = _orphaned_now(owners)
    if orphans and confirm_after_s > 0:
        time.sleep(confirm_after_s)
        orphans &= _orphaned_now(owners)
    return orphans


def _orphaned_now(owners: set[int] | None) -> set[str]:
    from megatron_rlhf.parallel.ipc_orphans import mapped_inodes, pid_alive
    from megatron_rlhf.rollout.engine_scratch import SCRATCH_PREFIX
    from megatron_rlhf.rollout.vllm_plugin import LEDGER_PREFIX

    mapped = mapped_inodes()
    orphans = set()
    for path in (*glob.glob("/dev/shm/psm_*"), *glob.glob("/dev/shm/sem.mp-*")):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue
        if (stat.st_dev, stat.st_ino) not in mapped:
            orphans.add(path)
    for prefix in (LEDGER_PREFIX, SCRATCH_PREFIX):
        for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}*")):
            owner = int(os.path.basename(path)[len(prefix):].split("_")[0])
            if not pid_alive(owner) and (owners is None or owner in owners):
                orphans.add(path)
    return orphans
