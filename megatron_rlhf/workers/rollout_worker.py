"""The rollout engine as a Ray actor (disaggregated placement) and its proxy for weight sync.

Colocated placement (the default) starts the :class:`~megatron_rlhf.rollout.engine.RolloutEngine`
inside the actor group's rank 0 (:meth:`ActorWorker.attach_engine`), so generation and weight
sync need no extra hop. Disaggregated placement runs it here, in its own Ray actor on its own
devices; the actor's rank 0 then drives the weight transfer through :class:`RemoteEngine`, which
offers the three things :class:`~megatron_rlhf.rollout.weight_sync.WeightSync` uses
(``backend``, ``config``, ``llm.collective_rpc``, and ``llm.submit``: a call started without
waiting, whose Ray handle another process can wait on) by calling this actor. On a one-host
CPU cluster the engine takes ``shm`` weight syncs (the sender shares its ``/dev/shm``), else
``gloo``; GPU engines take ``nccl``.

Guarantee: the engine is shut down when the actor is (``shutdown``), so no vLLM engine-core
process outlives the run.
"""

from __future__ import annotations

from typing import Any, Iterator

from megatron_rlhf.types import RolloutBatch


def compute_on_bound_cores(config: Any) -> None:
    """An engine that will run in this actor's own process (``engine_process`` resolving to
    ``in_process``) computes on the process's torch threads: given a core list
    (``cpu_threads_bind``, the run's core split), this process, which holds nothing but the
    engine, runs on those cores with one torch thread per core, as vLLM's worker would."""
    import os

    import torch

    from megatron_rlhf.config.cpu_split import AUTO, NOBIND, parse_cores
    from megatron_rlhf.rollout.engine_in_process import IN_PROCESS, engine_process_here

    if config.cpu_threads_bind in (AUTO, NOBIND) or engine_process_here(config) != IN_PROCESS:
        return
    cores = parse_cores(config.cpu_threads_bind)
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def on_the_only_host() -> bool:
    """The Ray cluster has one live node, so the trainer's sending rank shares this host (and
    its ``/dev/shm``): a CPU engine then takes ``shm`` weight syncs instead of ``gloo``'s TCP."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")) == 1


def disaggregated_transfer_backend(on_gpu: bool) -> str:
    """``weight_transfer_backend: auto`` for an engine of its own: GPU engines have devices of
    their own, so NCCL even on the trainer's host (CUDA IPC is for an engine on the trainer's
    own GPU); a CPU engine takes ``shm`` where it shares the trainer's host, else ``gloo``."""
    from megatron_rlhf.rollout.engine import resolve_transfer_backend

    return resolve_transfer_backend("auto", on_gpu, same_host=not on_gpu and on_the_only_host())


class RolloutWorker:
    """Holds one :class:`RolloutEngine` (vLLM's own TP inside it)."""

    def __init__(self, rank: int, world_size: int, config: Any):
        from megatron_rlhf.rollout.engine import RolloutEngine

        if world_size != 1:
            raise ValueError("a rollout worker group has one Ray actor per engine (world_size=1)")
        if config.weight_transfer_backend == "auto":  # the trainer may be on another host
            from dataclasses import replace

            import torch

            config = replace(config, weight_transfer_backend=disaggregated_transfer_backend(torch.cuda.is_available()))
        compute_on_bound_cores(config)
        self.engine = RolloutEngine(config)

    def rendezvous_address(self) -> tuple[str, int]:
        return "127.0.0.1", 0

    def join_process_group(self, address: str, port: int) -> None:
        """The engine has no trainer process group; vLLM manages its own workers."""

    def describe(self) -> tuple[str, Any]:
        return self.engine.backend, self.engine.config

    def generate(self, prompts: list, settings: Any) -> RolloutBatch:
        return self.engine.generate(prompts, settings)

    def generate_stream(self, prompts: list, settings: Any) -> Iterator[Any]:
        """:mod:`~megatron_rlhf.rollout.stream` events (call with ``num_returns="streaming"``)."""
        yield from self.engine.generate_stream(prompts, settings)

    def collective_rpc(self, method: str, kwargs: dict | None = None) -> Any:
        return self.engine.llm.collective_rpc(method, kwargs=kwargs or {})

    def shutdown(self) -> None:
        self.engine.shutdown()


class RemoteCall:
    """A ``collective_rpc`` started on a :class:`RolloutWorker` (a Ray task): ``result()`` waits
    for it; ``ref``, its Ray object, can be handed to another process to wait on."""

    def __init__(self, ref: Any):
        self.ref = ref

    def result(self) -> Any:
        import ray

        return ray.get(self.ref)


def wait_engine_calls(refs: list) -> None:
    """Wait for the ``ref`` of :class:`RemoteCall` objects another process started (raises the first failure)."""
    if refs:
        import ray

        ray.get(list(refs))


class _RemoteLLM:
    def __init__(self, handle: Any):
        self.handle = handle

    def collective_rpc(self, method: str, kwargs: dict | None = None) -> Any:
        return self.submit(method, kwargs).result()

    def submit(self, method: str, kwargs: dict | None = None) -> RemoteCall:
        """Start the call; calls submitted from one process run in submission order."""
        return RemoteCall(self.handle.collective_rpc.remote(method, kwargs))


class RemoteEngine:
    """A disaggregated engine seen from the actor's rank 0 (enough for WeightSync)."""

    def __init__(self, handle: Any):
        import ray

        self.handle = handle
        self.backend, self.config = ray.get(handle.describe.remote())
        self.llm = _RemoteLLM(handle)

    def generate(self, prompts: list, settings: Any) -> RolloutBatch:
        import ray

        return ray.get(self.handle.generate.remote(prompts, settings))

    def generate_stream(self, prompts: list, settings: Any) -> Iterator[Any]:
        """The engine's stream events, each as the engine yields it (a Ray streaming generator)."""
        yield from stream_from_ray(self.handle.generate_stream, prompts, settings)

    def release_memory(self) -> bool:
        """Nothing to hand over: a disaggregated engine has devices of its own."""
        return False

    def wake(self, tags: Any = ()) -> None:
        """Nothing was released (see :meth:`release_memory`)."""


def stream_from_ray(method: Any, *args: Any) -> Iterator[Any]:
    """Call a Ray actor's generator ``method`` as a streaming generator; yield its items as they come."""
    import ray

    for ref in method.options(num_returns="streaming").remote(*args):
        yield ray.get(ref)
