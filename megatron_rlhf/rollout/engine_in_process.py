"""vLLM's engine in the calling process (``RolloutConfig.engine_process``).

vLLM's own layout starts an engine-core process and, from it, one worker process per TP rank;
on CPU both are spawned and each imports torch and vLLM before the model loads. Measured on the
tiny llama (2 cores, idle): ``LLM(...)`` 19.0 s and 38.8 CPU-s in all; with the engine core and
its one worker in the caller (vLLM's ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` with its one-process
executor), 3.6 s and 20 CPU-s, in a process that has imported vLLM already (the actor's rank 0
has: it holds the colocated engine). Generation then runs in the caller's thread on its torch
threads: the engine core's scheduling and the model no longer overlap on two cores (2048 tokens
of the tiny model: 0.42 s against 0.35 s).

Choice (:func:`resolve_engine_process`): ``in_process`` needs a CPU engine of TP 1 (one worker),
a process whose ``torch.distributed`` world, if it has one, is a single rank (vLLM's worker
builds its groups in the process's world: groups of a larger world would need every rank to
take part), and a host of one NUMA node (vLLM's CPU worker binds its process's memory to a node,
which would bind the trainer's too). ``auto`` picks it there and ``separate`` elsewhere; an explicit ``in_process`` where
it cannot run is a :class:`~megatron_rlhf.config.errors.UserError` naming why, before vLLM starts.
GPU engines stay separate: vLLM's CUDA-IPC weight transfer opens handles from another process.

Guarantees of an in-process engine (:class:`InProcessEngine`):

- ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set only while the engine starts (with the engine's other
  variables, :mod:`.engine_environment`);
- what vLLM changes process-wide while starting is undone once it has started: its CPU worker
  replaces ``torch.set_num_threads`` with a no-op (put back) and its engine core freezes vLLM's
  environment reads (thawed, so a later engine of this process reads its own variables);
- at shutdown the heap vLLM froze at start-up is unfrozen and collected (the model and KV cache
  are freed); when the process's last in-process engine shuts down (several may live at once and
  share vLLM's process-wide groups) vLLM's parallel groups are destroyed, and so is the
  ``torch.distributed`` default group if vLLM created it (the process had none when the first
  started), never one the process had (the actor rank's own); a later engine, or a process group,
  can then start in this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from megatron_rlhf.config.errors import UserError

log = logging.getLogger(__name__)

IN_PROCESS = "in_process"
SEPARATE = "separate"
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


class EngineProcessUnavailable(UserError):
    """``engine_process: in_process`` asked for where an in-process engine cannot run."""


def in_process_obstacle(on_gpu: bool, tensor_parallel: int, process_world_size: int | None,
                        numa_nodes: int = 1) -> str | None:
    """Why an engine cannot run in this process (None: it can). ``process_world_size``: the size
    of this process's ``torch.distributed`` world, None without one; ``numa_nodes``: the host's
    (:func:`host_numa_nodes`). Pure."""
    if on_gpu:
        return "GPU engines run in vLLM's own processes (its CUDA-IPC weight transfer needs a second process)"
    if tensor_parallel != 1:
        return f"the engine has tensor_parallel={tensor_parallel} workers; in this process it can have one"
    if numa_nodes > 1:
        return (f"this host has {numa_nodes} NUMA nodes and vLLM's CPU worker binds its whole process's memory to "
                "one of them")
    if process_world_size is not None and process_world_size > 1:
        return (f"this process is one of {process_world_size} torch.distributed ranks; vLLM's worker would build "
                "its groups across all of them")
    return None


def host_numa_nodes(root: str = "/sys/devices/system/node") -> int:
    """NUMA nodes of this host (1 where the kernel does not say)."""
    try:
        return max(1, sum(1 for name in os.listdir(root) if name.startswith("node") and name[4:].isdigit()))
    except OSError:
        return 1


def resolve_engine_process(requested: str, on_gpu: bool, tensor_parallel: int,
                           process_world_size: int | None, numa_nodes: int | None = None) -> str:
    """``in_process`` or ``separate`` for ``requested`` (see the module docstring); raises
    :class:`EngineProcessUnavailable` for an ``in_process`` that cannot run here. ``numa_nodes``:
    None reads this host's."""
    numa_nodes = host_numa_nodes() if numa_nodes is None else numa_nodes
    obstacle = in_process_obstacle(on_gpu, tensor_parallel, process_world_size, numa_nodes)
    if requested == IN_PROCESS and obstacle is not None:
        raise EngineProcessUnavailable(f"engine_process=in_process: {obstacle}; use separate or auto")
    if requested == SEPARATE or obstacle is not None:
        return SEPARATE
    return IN_PROCESS


def engine_process_here(config: Any) -> str:
    """:func:`resolve_engine_process` of a ``RolloutConfig`` for an engine started in this
    process (this host's GPUs, NUMA nodes and torch.distributed world)."""
    import torch

    return resolve_engine_process(config.engine_process, torch.cuda.is_available(), config.tensor_parallel,
                                  process_world_size())


def process_world_size() -> int | None:
    """Size of this process's ``torch.distributed`` world, None when it has none."""
    import torch.distributed

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return torch.distributed.get_world_size()


_LOCK = threading.Lock()
_live_engines = 0
"""In-process engines of this process started and not yet shut down: they share vLLM's
process-wide parallel state, which only the last one's shutdown may tear down."""
_vllm_made_default_group = False
"""Whether the first of them found no torch.distributed world (vLLM's worker then made the
default group, which the last one's shutdown destroys)."""


class InProcessEngine:
    """What starting an engine in this process changes, and its undoing (module docstring).

    Use: ``state = InProcessEngine()``; ``with state.starting(): llm = LLM(...)``; then
    ``state.shutdown(llm)`` (or ``state.release()`` when the start failed). Several may live in one
    process at once (an evaluation engine beside a test's): they share vLLM's groups, which the
    last one to shut down destroys."""

    def __init__(self) -> None:
        self.started = False
        self.released = False

    def starting(self) -> "_Starting":
        global _live_engines, _vllm_made_default_group
        with _LOCK:
            if _live_engines == 0:
                _vllm_made_default_group = process_world_size() is None
            _live_engines += 1
        self.started = True
        return _Starting()

    def _leave(self) -> tuple[bool, bool]:
        """This engine no longer counts: ``(tear vLLM's groups down, destroy the default group too)``."""
        global _live_engines
        self.released = True
        with _LOCK:
            _live_engines -= 1
            last = _live_engines == 0
        return last, last and _vllm_made_default_group

    def shutdown(self, llm: Any) -> None:
        """vLLM's own teardown of the engine core: its executor and worker shut down, the heap it
        froze unfrozen, garbage collected; its groups destroyed by the last in-process engine
        only, and the process's own default group (if it had one) kept."""
        groups, default_group = self._leave()
        with _teardown(groups, default_group):
            llm.llm_engine.engine_core.shutdown()

    def release(self) -> None:
        """After a start that failed half-way: the same teardown of what vLLM had set up. Idempotent."""
        if self.released or not self.started:
            return
        from vllm.distributed import parallel_state

        groups, default_group = self._leave()
        with _teardown(groups, default_group):
            parallel_state.cleanup_dist_env_and_memory()


@contextlib.contextmanager
def _teardown(groups: bool, default_group: bool) -> Iterator[None]:
    """While inside, vLLM's teardown destroys its groups only if ``groups``, and the process's
    default ``torch.distributed`` group only if ``default_group`` as well."""
    from vllm.distributed import parallel_state

    destroy_model_parallel = parallel_state.destroy_model_parallel
    destroy_environment = parallel_state.destroy_distributed_environment

    def destroy_vllm_world() -> None:
        world, parallel_state._WORLD, parallel_state._NODE_COUNT = parallel_state._WORLD, None, None
        if world is not None:
            world.destroy()

    if not groups:  # another in-process engine still uses them
        parallel_state.destroy_model_parallel = lambda: None
        parallel_state.destroy_distributed_environment = lambda: None
    elif not default_group:
        parallel_state.destroy_distributed_environment = destroy_vllm_world
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel = destroy_model_parallel
        parallel_state.destroy_distributed_environment = destroy_environment


class _Starting:
    """Puts back what vLLM's in-process start-up changes for the whole process."""

    def __enter__(self) -> None:
        import torch

        self.set_num_threads = torch.set_num_threads

    def __exit__(self, *exc_info: object) -> None:
        import torch
        from vllm import envs

        torch.set_num_threads = self.set_num_threads  # vLLM's CPU worker made it a no-op
        envs.disable_envs_cache()  # its engine core froze the variables this start saw
