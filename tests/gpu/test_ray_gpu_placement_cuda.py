"""On CUDA with real GPUs under Ray: each rank's torch device is the physical GPU Ray assigned.

Colocated groups land on the same physical GPU (same device UUID) rank by rank; a disaggregated
group lands on another GPU (two GPUs needed). Complements the logical-GPU test on CPU
(tests/integration/test_gpu_placement.py), which checks the ids but cannot check devices.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
ray = pytest.importorskip("ray")


class CudaProbe:
    def __init__(self, rank: int, world_size: int):
        self.rank = rank

    def rendezvous_address(self) -> tuple[str, int]:
        return "127.0.0.1", 0

    def join_process_group(self, address: str, port: int) -> None:
        """No process group is needed to report a device."""

    def device_uuid(self) -> tuple[int, str]:
        from megatron_rlhf.workers.placement import assigned_local_device

        index = assigned_local_device()
        torch.cuda.set_device(index)
        return torch.cuda.device_count(), str(torch.cuda.get_device_properties(index).uuid)

    def shutdown(self) -> None:
        """Nothing to release."""


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_ranks_use_the_physical_gpu_ray_assigned(placement):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if placement == "disaggregated" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from megatron_rlhf.config.resources import ResourcesConfig
    from megatron_rlhf.workers.group import WorkerGroup
    from megatron_rlhf.workers.placement import plan_run_placement

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        sizes = {"actor": 1, "reference": 1}
        run = plan_run_placement(ResourcesConfig(gpus_per_node=torch.cuda.device_count()), placement, sizes)
        groups = {name: WorkerGroup(name, CudaProbe, size, run.trainers) for name, size in sizes.items()}
        try:
            seen = {name: group.call("device_uuid") for name, group in groups.items()}
        finally:
            for group in groups.values():
                group.shutdown()
            run.remove()
    finally:
        ray.shutdown()
    assert all(count == 1 for count, _ in seen.values())  # each rank sees only its GPU
    same = seen["actor"][1] == seen["reference"][1]
    assert same == (placement == "colocated")
