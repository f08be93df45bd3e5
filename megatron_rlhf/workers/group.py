"""Worker groups on Ray: N actors that form one torch.distributed world and are called together.

A :class:`WorkerGroup` starts ``world_size`` Ray actors of one worker class on bundles of a Ray
placement group, asks rank 0 for an address and a free port on its node (so the same code works
on a local cluster of CPU processes and across the nodes of a GPU cluster), then initialises
every rank's process group with it. :meth:`WorkerGroup.all` runs a method on every rank at once
(Megatron methods are collectives) with the same arguments. It is the transport under the typed
role proxies of :mod:`megatron_rlhf.workers.role_proxies`, which the RL controller uses: they
hand each data-parallel replica only its share of a batch and read results only from the rank
that holds them.

Placement (:class:`PlacementPlan`): ``colocated`` (default) puts every group's rank ``r`` on
bundle ``r`` of one shared placement group, each actor asking for a fraction of the bundle, so
the actor, critic, reference and reward model of rank ``r`` share its devices (the engine
releases its memory while the trainer runs, where the backend supports it).
``disaggregated`` gives each group its own placement group (separate devices).

Start-up: groups created with ``join=False`` and then joined (:meth:`WorkerGroup.begin_join`,
whose results the caller waits for) load at the same time: the RL run starts its actor,
reference, critic and reward-model groups and the disaggregated engines together.

Not guaranteed: Ray restarts of dead actors (``max_restarts=0``: a dead worker fails the step,
and the run resumes from its last complete checkpoint).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
PLACEMENTS = ("colocated", "disaggregated")


@dataclass(frozen=True)
class PlacementPlan:
    placement: str = "colocated"
    """colocated (all groups share one placement group's bundles) | disaggregated (one each)."""
    bundles: int = 1
    """Bundles (ranks) in the shared placement group; at least the largest group's world size."""
    devices_per_bundle: float = 0.0
    """GPUs per bundle (0 on CPU machines)."""
    cpus_per_bundle: float = 1.0
    """CPUs reserved per bundle. Colocated actors split it, so it bounds the group's CPU ask."""
    colocated_share: float = 0.2
    """Fraction of a bundle each colocated actor asks for (at most 1 / groups on a bundle)."""

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r} (choose {PLACEMENTS})")
        if self.bundles < 1 or self.cpus_per_bundle <= 0 or self.devices_per_bundle < 0:
            raise ValueError("bundles >= 1, cpus_per_bundle > 0 and devices_per_bundle >= 0 are required")
        if not 0 < self.colocated_share <= 1:
            raise ValueError(f"colocated_share={self.colocated_share} must be in (0, 1]")


def _bundle(plan: PlacementPlan) -> dict[str, float]:
    bundle = {"CPU": plan.cpus_per_bundle}
    if plan.devices_per_bundle:
        bundle["GPU"] = plan.devices_per_bundle
    return bundle


class Placement:
    """The placement groups of one run (created lazily, removed by :meth:`remove`)."""

    def __init__(self, plan: PlacementPlan):
        self.plan = plan
        self.shared = None
        self.owned: list[Any] = []

    def bundles_for(self, world_size: int) -> tuple[Any, float]:
        """``(placement group, share of a bundle per actor)`` for a group of ``world_size``."""
        from ray.util.placement_group import placement_group

        if self.plan.placement == "colocated":
            if world_size > self.plan.bundles:
                raise ValueError(
                    f"a worker group of {world_size} ranks does not fit the colocated placement "
                    f"of {self.plan.bundles} bundles (PlacementPlan.bundles)"
                )
            if self.shared is None:
                self.shared = placement_group([_bundle(self.plan)] * self.plan.bundles, strategy="PACK")
                self.owned.append(self.shared)
                _wait_ready(self.shared)
            return self.shared, self.plan.colocated_share
        group = placement_group([_bundle(self.plan)] * world_size, strategy="PACK")
        self.owned.append(group)
        _wait_ready(group)
        return group, 1.0

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.owned:
            remove_placement_group(group)
        self.owned.clear()
        self.shared = None


def _wait_ready(group: Any, timeout_seconds: float = 300.0) -> None:
    import ray

    ready, _ = ray.wait([group.ready()], timeout=timeout_seconds)
    if not ready:
        raise RuntimeError(
            f"Ray placement group {group.bundle_specs} was not placed within {timeout_seconds:.0f} s: "
            "the cluster lacks the CPUs/GPUs it asks for (see `ray status`)"
        )


class WorkerGroup:
    """``world_size`` Ray actors of ``worker_class`` forming one torch.distributed world."""

    def __init__(self, name: str, worker_class: type, world_size: int, placement: Placement,
                 init_args: tuple[Any, ...] = (), join: bool = True):
        """Start the ranks; ``join``: also form their process group now (else :meth:`begin_join`
        later, so several groups start and join at once: :func:`join_groups`)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name = name
        self.world_size = world_size
        group, share = placement.bundles_for(world_size)
        plan = placement.plan
        remote_class = ray.remote(max_restarts=0)(worker_class)
        self.workers = [
            remote_class.options(
                name=None,
                num_cpus=plan.cpus_per_bundle * share,
                num_gpus=plan.devices_per_bundle * share,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
                runtime_env={"env_vars": _forwarded_environment()},
            ).remote(rank, world_size, *init_args)
            for rank in range(world_size)
        ]
        self._rendezvous = self.workers[0].rendezvous_address.remote()
        if join:
            ray.get(self.begin_join())

    def begin_join(self) -> list[Any]:
        """Start forming the ranks' process group (waits only for rank 0's rendezvous address);
        the ranks' pending results (``ray.get`` them: the group is ready when they are)."""
        import ray

        address, port = ray.get(self._rendezvous)
        log.info("worker group %s: %d ranks, rendezvous %s:%d", self.name, self.world_size, address, port)
        return self.all_async("join_process_group", address, port)

    def all_async(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Start ``method`` on every rank; the pending results (Ray object refs) by rank."""
        return [getattr(worker, method).remote(*args, **kwargs) for worker in self.workers]

    def all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``method`` on every rank concurrently; results by rank."""
        import ray

        return ray.get(self.all_async(method, *args, **kwargs))

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run a collective ``method`` on every rank; the rank-0 result."""
        return self.all(method, *args, **kwargs)[0]

    def shutdown(self) -> None:
        import ray

        try:
            self.all("shutdown")
        except Exception as error:  # noqa: BLE001 - a dead worker cannot shut down; kill it below
            log.warning("worker group %s: shutdown failed (%s); killing its actors", self.name, error)
        for worker in self.workers:
            ray.kill(worker)


def _forwarded_environment() -> dict[str, str]:
    """Settings the workers must share with the driver (offline hub, thread binding, warnings)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "PYTHONWARNINGS",
             "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "CUBLAS_WORKSPACE_CONFIG",
             "MEGATRON_RLHF_DETERMINISTIC")
    return {name: os.environ[name] for name in names if name in os.environ}
