"""Where a run's worker groups and rollout engines go: Ray placement groups that ask for GPUs.

:func:`plan_run_placement` turns a :class:`~megatron_rlhf.config.resources.ResourcesConfig`, the
placement mode and the group sizes into a :class:`RunPlacement`:

- trainer groups (actor, reference, critic, reward models): one bundle per rank with
  ``resources.gpus_per_rank`` GPUs (1 on a GPU run) and ``cpus_per_worker`` CPUs.
  ``colocated``: all groups share one placement group; rank ``r`` of every group lands on bundle
  ``r`` and asks for a fraction of it (fractional GPU), so they share the same GPU.
  ``disaggregated``: each group gets its own placement group, hence its own GPUs.
- rollout engines (disaggregated only): one placement group per engine with a single bundle
  holding its vLLM TP size in GPUs; the engine's vLLM workers use the GPUs Ray gave that actor.
  Colocated, the engine lives in the actor's rank 0 process and shares its GPU.

:func:`assigned_local_device` is how a rank takes the GPU Ray assigned it: Ray sets
``CUDA_VISIBLE_DEVICES`` to the assigned ids, so the rank's device is local index 0 of what it
sees. Nothing here builds a model or touches CUDA, so placement is tested on CPU with Ray's
logical GPUs (``ray.init(address="local", num_gpus=N)``).

Not guaranteed: that the GPUs are free of other work; NUMA or NVLink affinity (bundles are
packed, not topology-aware).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from megatron_rlhf.config.resources import ResourcesConfig, ResourcesError
from megatron_rlhf.workers.group import Placement, PlacementPlan


@dataclass
class RunPlacement:
    """The placement groups of one run: trainers (shared or per group) and one per engine."""

    trainers: Placement
    engines: list[Placement] = field(default_factory=list)

    def remove(self) -> None:
        for placement in [self.trainers, *self.engines]:
            placement.remove()


def gpus_needed(resources: ResourcesConfig, placement: str, trainer_sizes: dict[str, int],
                engine_tensor_parallels: tuple[int, ...]) -> int:
    """GPUs a run asks Ray for (0 on a CPU run)."""
    if not resources.uses_gpus:
        return 0
    if placement == "colocated":
        return max(trainer_sizes.values())
    return sum(trainer_sizes.values()) + sum(engine_tensor_parallels)


def plan_run_placement(resources: ResourcesConfig, placement: str, trainer_sizes: dict[str, int],
                       engine_tensor_parallels: tuple[int, ...] = ()) -> RunPlacement:
    """Placements for trainer groups of ``trainer_sizes`` ranks and disaggregated engines.

    ``engine_tensor_parallels``: the vLLM TP size of each disaggregated engine (empty when the
    engine is colocated in the actor's rank 0). Raises :class:`ResourcesError` when the run asks
    for more GPUs than ``resources`` offers, before Ray is asked for anything.
    """
    if placement == "colocated" and engine_tensor_parallels:
        raise ResourcesError("colocated placement runs its engine inside the actor; separate engines "
                             "need placement: disaggregated")
    resources.check_fits(gpus_needed(resources, placement, trainer_sizes, engine_tensor_parallels),
                         f"{placement} placement of {trainer_sizes} + engines {list(engine_tensor_parallels)}")
    colocated_groups = max(len(trainer_sizes), 1)
    trainers = Placement(PlacementPlan(
        placement=placement, bundles=max(trainer_sizes.values()),
        devices_per_bundle=float(resources.gpus_per_rank), cpus_per_bundle=resources.cpus_per_worker,
        colocated_share=min(0.2, 1.0 / colocated_groups) if placement == "colocated" else 0.2,
    ))
    engines = [
        Placement(PlacementPlan(placement="disaggregated", bundles=1,
                                devices_per_bundle=float(tp * resources.gpus_per_rank),
                                cpus_per_bundle=resources.cpus_per_worker))
        for tp in engine_tensor_parallels
    ]
    return RunPlacement(trainers, engines)


def assigned_gpu_ids() -> list[str]:
    """GPU ids Ray assigned to this actor (empty outside Ray or on a CPU run)."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        return [str(gpu) for gpu in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - outside a Ray worker there is nothing assigned
        return []


def assigned_local_device() -> int | None:
    """Local CUDA index of the GPU Ray gave this rank: 0, since Ray narrows
    ``CUDA_VISIBLE_DEVICES`` to the assigned ids; None when Ray assigned none."""
    ids = assigned_gpu_ids()
    if not ids:
        return None
    visible = [item for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item]
    if visible and visible[0] != ids[0]:
        raise RuntimeError(
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} does not start with the "
            f"GPU Ray assigned ({ids}); something overrode Ray's device assignment"
        )
    return 0


def describe_device() -> dict[str, Any]:
    """What this rank was given: Ray's GPU ids, CUDA_VISIBLE_DEVICES, the local device index."""
    return {"gpu_ids": assigned_gpu_ids(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "local_device": assigned_local_device(), "pid": os.getpid()}
