"""What processes killed with SIGKILL leave in ``/dev/shm``: named semaphores found and removed.

Also the two tests the other sweepers use: :func:`pid_alive` (the weight sync's segments and the
vLLM engine's IPC ledgers carry their creator's pid) and :func:`mapped_inodes`.

Python's ``multiprocessing`` (spawn and forkserver contexts: Megatron's checkpoint writer, torch's
process pools, vLLM's engine) creates each lock, queue and event as a named POSIX semaphore,
``/dev/shm/sem.mp-<random>``, which its creator unlinks when the object is finalised and its
resource tracker unlinks if the creator dies. A run killed with SIGKILL as a whole (the crashed
node the resume test plays) takes the resource tracker with it, and the semaphores stay until
the machine reboots.

Guarantee: :func:`remove_orphaned_semaphores` removes only ``sem.mp-*`` files of this user that
no live process maps. A live semaphore is always mapped: every ``SemLock`` object holds its
``sem_t`` mapped from ``sem_open`` until it is finalised, in every process that has it (a
semaphore passed to a child is mapped by the parent until the child has opened it). Mappings
are matched by device and inode from ``/proc/<pid>/maps``, not by path: glibc maps a new
semaphore under a temporary name before it links the final one. A process whose map this user
cannot read is taken to hold none of them: another user's process cannot open this user's
semaphores (mode 0600), and the same user's unreadable ones are a container's init and the like,
which run no ``multiprocessing``. Linux only; a no-op elsewhere.

Shared-memory segments (``psm_*``) are not swept here: a segment may legitimately outlive every
mapping (created, closed, attached later by name). The vLLM engine's own segments are released
through its ledger (:mod:`megatron_rlhf.rollout.vllm_plugin`), and the weight sync's by owner pid
(:mod:`megatron_rlhf.rollout.shm_transfer`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SEMAPHORE_GLOB = "sem.mp-*"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs in this pid namespace (a process of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def mapped_inodes() -> set[tuple[int, int]]:
    """``(device, inode)`` of every file mapped by a live process whose map this user can read."""
    mapped: set[tuple[int, int]] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) < 6 or fields[4] == "0":
                        continue
                    major, minor = fields[3].split(":")
                    mapped.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
        except (FileNotFoundError, ProcessLookupError, PermissionError):  # exited meanwhile; not readable
            continue
    return mapped


def remove_orphaned_semaphores(directory: Path = SHM_DIR) -> list[str]:
    """Unlink this user's ``sem.mp-*`` semaphores that no live process maps; their names."""
    if not Path("/proc/self/maps").exists() or not directory.is_dir():
        return []
    candidates = []
    for path in directory.glob(SEMAPHORE_GLOB):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if stat.st_uid == os.geteuid():
            candidates.append((path, (stat.st_dev, stat.st_ino)))
    if not candidates:
        return []
    mapped = mapped_inodes()
    removed = []
    for path, key in candidates:
        if key in mapped:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path.name)
    if removed:
        log.info("removed %d semaphore(s) in %s left by processes killed without clean-up", len(removed), directory)
    return removed
