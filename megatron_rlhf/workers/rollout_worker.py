"""The rollout engine as a Ray actor (disaggregated placement) and its proxy for weight sync.

Colocated placement (the default) starts the :class:`~megatron_rlhf.rollout.engine.RolloutEngine`
inside the actor group's rank 0 (:meth:`ActorWorker.attach_engine`), so generation and weight
sync need no extra hop. Disaggregated placement runs it here, in its own Ray actor on its own
devices; the actor's rank 0 then drives the weight transfer through :class:`RemoteEngine`, which
offers the three things :class:`~megatron_rlhf.rollout.weight_sync.WeightSync` uses
(``backend``, ``config``, ``llm.collective_rpc``) by calling this actor.

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


class RolloutWorker:
    """Holds one :class:`RolloutEngine` (vLLM's own TP inside it)."""

    def __init__(self, rank: int, world_size: int, config: Any):
        from megatron_rlhf.rollout.engine import RolloutEngine

        if world_size != 1:
            raise ValueError("a rollout worker group has one Ray actor per engine (world_size=1)")
        if config.weight_transfer_backend == "auto":  # the trainer may be on another host
            from dataclasses import replace

            import torch

            from megatron_rlhf.rollout.engine import resolve_transfer_backend

            backend = resolve_transfer_backend("auto", torch.cuda.is_available(), same_host=False)
            config = replace(config, weight_transfer_backend=backend)
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


class _RemoteLLM:
    def __init__(self, handle: Any):
        self.handle = handle

    def collective_rpc(self, method: str, kwargs: dict | None = None) -> Any:
        import ray

        return ray.get(self.handle.collective_rpc.remote(method, kwargs))


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
