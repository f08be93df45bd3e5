"""Placement on real Ray with logical GPUs (Ray lets a CPU machine declare GPUs it lacks).

Every worker group of a run is placed as planned by :func:`plan_run_placement` (the function the
RL loop uses): colocated groups share the same GPU ids rank by rank, disaggregated groups get GPUs
of their own, several engines each get their own (as many as their vLLM TP size), and each rank
sees exactly the GPU Ray gave it (``ray.get_gpu_ids()`` and ``CUDA_VISIBLE_DEVICES`` inside the
actor). The ranks are real Ray actors started by the real :class:`WorkerGroup`; they report their
assignment instead of building CUDA models, which a CPU machine cannot.
"""

from __future__ import annotations

import pytest

from megatron_rlhf.config.resources import ResourcesConfig, ResourcesError
from megatron_rlhf.workers.placement import gpus_needed, plan_run_placement

ray = pytest.importorskip("ray")


class DeviceProbe:
    """A worker-group rank that reports the GPU it was assigned (the workers' own function)."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank

    def rendezvous_address(self) -> tuple[str, int]:
        return "127.0.0.1", 0

    def join_process_group(self, address: str, port: int) -> None:
        """Placement only: no process group is needed to report a device."""

    def device(self) -> dict:
        from megatron_rlhf.workers.placement import describe_device

        return describe_device()

    def shutdown(self) -> None:
        """Nothing to release."""


@pytest.fixture(scope="module")
def logical_gpu_cluster(ray_cluster):
    """The tier's session Ray, which declares 8 logical GPUs (``tests/integration/conftest.py``)."""
    assert ray_cluster.cluster_resources().get("GPU") == 8
    return ray_cluster


def _place(run, sizes: dict[str, int], engines: tuple[int, ...] = ()) -> dict[str, list[dict]]:
    from megatron_rlhf.workers.group import WorkerGroup

    groups = {name: WorkerGroup(name, DeviceProbe, size, run.trainers) for name, size in sizes.items()}
    groups.update({f"engine{i}": WorkerGroup(f"engine{i}", DeviceProbe, 1, placement)
                   for i, placement in enumerate(run.engines)})
    try:
        return {name: group.all("device") for name, group in groups.items()}
    finally:
        for group in groups.values():
            group.shutdown()
        run.remove()


def _check_rank_sees_its_gpu(report: dict) -> None:
    assert report["cuda_visible_devices"] == ",".join(report["gpu_ids"])
    assert report["local_device"] == 0


def test_colocated_groups_share_the_gpu_of_each_rank(logical_gpu_cluster):
    resources = ResourcesConfig(gpus_per_node=8)
    sizes = {"actor": 4, "reference": 4, "critic": 2}
    placed = _place(plan_run_placement(resources, "colocated", sizes), sizes)
    actor_gpus = [r["gpu_ids"] for r in placed["actor"]]
    assert all(len(ids) == 1 for ids in actor_gpus) and len({ids[0] for ids in actor_gpus}) == 4
    assert [r["gpu_ids"] for r in placed["reference"]] == actor_gpus
    assert [r["gpu_ids"] for r in placed["critic"]] == actor_gpus[:2]
    for reports in placed.values():
        for report in reports:
            _check_rank_sees_its_gpu(report)


def test_disaggregated_groups_and_engines_get_their_own_gpus(logical_gpu_cluster):
    resources = ResourcesConfig(gpus_per_node=8)
    sizes = {"actor": 2, "reference": 2}
    engines = (1, 2)  # two rollout engines: vLLM TP1 and TP2
    assert gpus_needed(resources, "disaggregated", sizes, engines) == 7
    placed = _place(plan_run_placement(resources, "disaggregated", sizes, engines), sizes, engines)
    ids = {name: [gpu for report in reports for gpu in report["gpu_ids"]] for name, reports in placed.items()}
    assert [len(ids[name]) for name in ("actor", "reference", "engine0", "engine1")] == [2, 2, 1, 2]
    every = [gpu for name in ids for gpu in ids[name]]
    assert len(every) == len(set(every)) == 7  # nobody shares a GPU
    for name in ("actor", "reference", "engine0"):
        for report in placed[name]:
            _check_rank_sees_its_gpu(report)
    (engine,) = placed["engine1"]  # the TP2 engine's actor sees both GPUs its vLLM workers use
    assert sorted(engine["cuda_visible_devices"].split(",")) == sorted(engine["gpu_ids"])


def test_cpu_run_asks_for_no_gpu(logical_gpu_cluster):
    placed = _place(plan_run_placement(ResourcesConfig(), "colocated", {"actor": 2}), {"actor": 2})
    assert all(report["gpu_ids"] == [] and report["local_device"] is None for report in placed["actor"])


def test_a_run_larger_than_the_cluster_fails_before_asking_ray():
    with pytest.raises(ResourcesError, match="needs 9 GPUs but resources offer nodes=1 x gpus_per_node=8"):
        plan_run_placement(ResourcesConfig(gpus_per_node=8), "disaggregated", {"actor": 4, "reference": 4}, (1,))
    with pytest.raises(ResourcesError, match="placement: disaggregated"):
        plan_run_placement(ResourcesConfig(gpus_per_node=8), "colocated", {"actor": 2}, (1,))
