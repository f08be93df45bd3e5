"""One cgroup per sandbox execution: a memory limit and a process limit for the whole process tree.

Layout: ``<trainer's own cgroup>/<cgroup_parent>/<trainer pid>-<n>`` in the v1 ``pids`` and
``memory`` hierarchies; on a v2 (unified) hierarchy ``<parent of the trainer's cgroup>/
<cgroup_parent>/<trainer pid>-<n>`` with both controllers enabled (v2 forbids controllers in a
cgroup that holds processes, so the trainer's own cgroup cannot be the parent).

Guarantees: limits are written before any sandboxed process exists (the launcher joins the cgroup
and only then executes the sandbox); :meth:`ExecutionCgroup.destroy` kills whatever is left in it
(by pid, all of them inside this execution's cgroup), waits until it is empty and removes it.
Directories left by a trainer that died are removed by the next :class:`CgroupBackend` to start.

Not guaranteed: the v2 path is written to the kernel's documented interface but is not exercised
by this project's CI, whose machines mount cgroup v1; a v2 hierarchy without delegation of the
``pids`` and ``memory`` controllers to the trainer is reported as unavailable.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


_EXECUTION_NUMBERS = itertools.count()  # shared by every backend of this process: unique names


class CgroupsUnavailable(RuntimeError):
    """No writable cgroup hierarchy with the pids and memory controllers."""


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of the cgroup mounts, from /proc/self/mountinfo."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
            found.append((fields[4], rest[0], set(rest[2].split(","))))
    return found


def _own_cgroup_paths() -> dict[str, str]:
    """controller (or '' for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


@dataclass
class ExecutionCgroup:
    """The cgroup (one directory per hierarchy) of one execution."""

    directories: list[Path]
    version: int

    @property
    def procs_files(self) -> list[Path]:
        """Files the launcher writes its pid into before executing the sandbox."""
        return [directory / "cgroup.procs" for directory in self.directories]

    def memory_limit_hit(self) -> bool:
        """True if the execution hit its memory limit (an OOM kill or a failed charge)."""
        for directory in self.directories:
            if self.version == 2:
                events = _read_keyed(directory / "memory.events")
                return events.get("oom_kill", 0) > 0 or events.get("max", 0) > 0
            if (directory / "memory.failcnt").exists():
                oom = _read_keyed(directory / "memory.oom_control")
                failcnt = int((directory / "memory.failcnt").read_text().split()[0])
                return oom.get("oom_kill", 0) > 0 or failcnt > 0
        return False

    def pids(self) -> set[int]:
        pids: set[int] = set()
        for procs in self.procs_files:
            try:
                pids.update(int(line) for line in procs.read_text().split())
            except FileNotFoundError:
                continue
        return pids

    def destroy(self, timeout: float = 10.0) -> None:
        """Kill what is left inside, wait for it to be empty, remove the directories."""
        deadline = time.monotonic() + timeout
        if self.version == 2 and (self.directories[0] / "cgroup.kill").exists():
            _write(self.directories[0] / "cgroup.kill", "1")
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"processes {sorted(pids)} survived SIGKILL in {self.directories[0]}"
                )
            time.sleep(0.01)
        for directory in self.directories:
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the kernel finishes tearing the last task down
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)


def _read_keyed(path: Path) -> dict[str, int]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


class CgroupBackend:
    """Finds a writable pids+memory hierarchy and creates per-execution cgroups in it."""

    def __init__(self, parent_name: str) -> None:
        mounts = _mounts()
        own = _own_cgroup_paths()
        v1 = {
            controller: mount
            for mount, fstype, options in mounts
            for controller in ("pids", "memory")
            if fstype == "cgroup" and controller in options
        }
        problems = []
        if len(v1) == 2:
            self.version = 1
            self.parents = [
                Path(v1[c]) / own.get(c, "/").lstrip("/") / parent_name for c in ("pids", "memory")
            ]
        else:
            unified = [mount for mount, fstype, _ in mounts if fstype == "cgroup2"]
            if not unified:
                raise CgroupsUnavailable("no cgroup v1 pids+memory hierarchies and no cgroup2 mount")
            self.version = 2
            base = Path(unified[0]) / os.path.dirname(own.get("", "/")).lstrip("/")
            self.parents = [base / parent_name]
            available = (base / "cgroup.controllers").read_text().split()
            if not {"pids", "memory"} <= set(available):
                raise CgroupsUnavailable(
                    f"cgroup2 at {base} offers controllers {available}, not pids and memory"
                )
        try:
            for parent in self.parents:
                parent.mkdir(exist_ok=True)
            if self.version == 2:
                for directory in (self.parents[0].parent, self.parents[0]):
                    _write(directory / "cgroup.subtree_control", "+pids +memory")
        except OSError as error:
            problems.append(f"{error.filename}: {error.strerror}")
        if problems:
            raise CgroupsUnavailable(
                "cannot create the sandbox cgroups (" + "; ".join(problems) + "); run as root or "
                "with a delegated cgroup, or set sandbox.cgroups: false"
            )
        self._remove_stale()

    def create(self, memory_bytes: int, max_processes: int) -> ExecutionCgroup:
        name = f"{os.getpid()}-{next(_EXECUTION_NUMBERS)}"  # next() on a count is atomic under the GIL
        directories = [parent / name for parent in self.parents]
        for directory in directories:
            directory.mkdir()
        cgroup = ExecutionCgroup(directories, self.version)
        try:
            if self.version == 1:
                pids_dir, memory_dir = directories
                _write(pids_dir / "pids.max", str(max_processes))
                _write(memory_dir / "memory.limit_in_bytes", str(memory_bytes))
                if (memory_dir / "memory.memsw.limit_in_bytes").exists():
                    _write(memory_dir / "memory.memsw.limit_in_bytes", str(memory_bytes))
            else:
                (directory,) = directories
                _write(directory / "pids.max", str(max_processes))
                _write(directory / "memory.max", str(memory_bytes))
                if (directory / "memory.swap.max").exists():
                    _write(directory / "memory.swap.max", "0")
        except BaseException:
            cgroup.destroy()
            raise
        return cgroup

    def _remove_stale(self) -> None:
        """Remove execution cgroups of trainers that are no longer alive."""
        for parent in self.parents:
            for directory in parent.iterdir():
                owner, _, _ = directory.name.partition("-")
                if not directory.is_dir() or not owner.isdigit() or _alive(int(owner)):
                    continue
                try:
                    ExecutionCgroup([directory], self.version).destroy(timeout=2.0)
                except (OSError, RuntimeError):
                    continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
