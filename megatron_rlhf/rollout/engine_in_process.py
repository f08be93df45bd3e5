"""vLLM's engine in the calling process (``RolloutConfig.engine_process``).

vLLM's own layout starts an engine-core process and, from it, one worker process per TP rank;
on CPU both are spawned and each imports torch and vLLM before the model loads. Measured on the
tiny llama (2 cores, idle): ``LLM(...)`` 19.0 s and 38.8 CPU-s in all; with the engine core and
its one worker in the caller (vLLM's ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` with its one-process
executor), 3.6 s and 20 CPU-s, in a process that has imported vLLM already (the actor's rank 0
has: it holds the colocated engine). Generation then runs in the caller's thread on its torch
threads: the engine core's scheduling and the model no longer overlap on two cores (2048 tokens
of the tiny model: 0.42 s against 0.35 s).

Choice (:func:`resolve_engine_process`): ``in_process`` needs a CPU engine of TP 1 (one worker)
and a process whose ``torch.distributed`` world, if it has one, is a single rank (vLLM's worker
builds its groups in the process's world: groups of a larger world would need every rank to
take part). ``auto`` picks it there and ``separate`` elsewhere; an explicit ``in_process`` where
it cannot run is a :class:`~megatron_rlhf.config.errors.UserError` naming why, before vLLM starts.
GPU engines stay separate: vLLM's CUDA-IPC weight transfer opens handles from another process.

Guarantees of an in-process engine (:class:`InProcessEngine`):

- ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set only while the engine starts (with the engine's other
  variables, :mod:`.engine_environment`);
- what vLLM changes process-wide while starting is undone once it has started: its CPU worker
  replaces ``torch.set_num_threads`` with a no-op (put back) and its engine core freezes vLLM's
  environment reads (thawed, so a later engine of this process reads its own variables);
- at shutdown vLLM's parallel groups are destroyed, and so is the ``torch.distributed`` default
  group when vLLM created it (the process had none), never one the process had (the actor rank's
  own); the heap vLLM froze at start-up is unfrozen and collected, so the model and the KV cache
  are freed and a later engine, or a process group, can start in this process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from megatron_rlhf.config.errors import UserError

log = logging.getLogger(__name__)

IN_PROCESS = "in_process"
SEPARATE = "separate"
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


class EngineProcessUnavailable(UserError):
    """``engine_process: in_process`` asked for where an in-process engine cannot run."""


def in_process_obstacle(on_gpu: bool, tensor_parallel: int, process_world_size: int | None) -> str | None:
    """Why an engine cannot run in this process (None: it can). ``process_world_size``: the size
    of this process's ``torch.distributed`` world, None without one. Pure."""
    if on_gpu:
        return "GPU engines run in vLLM's own processes (its CUDA-IPC weight transfer needs a second process)"
    if tensor_parallel != 1:
        return f"the engine has tensor_parallel={tensor_parallel} workers; in this process it can have one"
    if process_world_size is not None and process_world_size > 1:
        return (f"this process is one of {process_world_size} torch.distributed ranks; vLLM's worker would build "
                "its groups across all of them")
    return None


def resolve_engine_process(requested: str, on_gpu: bool, tensor_parallel: int,
                           process_world_size: int | None) -> str:
    """``in_process`` or ``separate`` for ``requested`` (see the module docstring); raises
    :class:`EngineProcessUnavailable` for an ``in_process`` that cannot run here."""
    obstacle = in_process_obstacle(on_gpu, tensor_parallel, process_world_size)
    if requested == IN_PROCESS and obstacle is not None:
        raise EngineProcessUnavailable(f"engine_process=in_process: {obstacle}; use separate or auto")
    if requested == SEPARATE or obstacle is not None:
        return SEPARATE
    return IN_PROCESS


def process_world_size() -> int | None:
    """Size of this process's ``torch.distributed`` world, None when it has none."""
    import torch.distributed

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return torch.distributed.get_world_size()


class InProcessEngine:
    """What starting an engine in this process changes, and its undoing (module docstring).

    Use: ``state = InProcessEngine()``; ``with state.starting(): llm = LLM(...)``; then
    ``state.shutdown(llm)`` (or ``state.release()`` when the start failed)."""

    def __init__(self) -> None:
        self.had_process_group = process_world_size() is not None
        self.released = False

    def starting(self) -> "_Starting":
        return _Starting()

    def shutdown(self, llm: Any) -> None:
        """vLLM's own teardown of the engine core: its executor and worker shut down, the heap it
        froze unfrozen, its groups destroyed, garbage collected; the process's own default group
        (if it had one) kept."""
        self.released = True
        with _keeping_process_group(self.had_process_group):
            llm.llm_engine.engine_core.shutdown()

    def release(self) -> None:
        """After a start that failed half-way: the same teardown of what vLLM had set up. Idempotent."""
        if self.released:
            return
        self.released = True
        from vllm.distributed import parallel_state

        with _keeping_process_group(self.had_process_group):
            parallel_state.cleanup_dist_env_and_memory()


@contextlib.contextmanager
def _keeping_process_group(keep: bool) -> Iterator[None]:
    """While inside, with ``keep``: vLLM's teardown destroys its world group but not the process's
    default ``torch.distributed`` group (the actor rank's, which vLLM's worker only joined)."""
    if not keep:
        yield
        return
    from vllm.distributed import parallel_state

    destroy = parallel_state.destroy_distributed_environment

    def destroy_vllm_world() -> None:
        world, parallel_state._WORLD, parallel_state._NODE_COUNT = parallel_state._WORLD, None, None
        if world is not None:
            world.destroy()

    parallel_state.destroy_distributed_environment = destroy_vllm_world
    try:
        yield
    finally:
        parallel_state.destroy_distributed_environment = destroy


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
