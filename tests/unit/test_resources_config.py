"""ResourcesConfig: validation naming the field, derived GPU counts, the capacity check."""

from __future__ import annotations

import pytest

from megatron_rlhf.config.resources import ResourcesConfig, ResourcesError


def test_defaults_are_a_cpu_run():
    resources = ResourcesConfig()
    assert not resources.uses_gpus and resources.gpus_per_rank == 0 and resources.total_gpus == 0
    resources.check_fits(64, "anything")  # a CPU run has no GPU budget to exceed


def test_gpu_counts_and_fit():
    resources = ResourcesConfig(nodes=2, gpus_per_node=8, cpus_per_worker=4)
    assert resources.total_gpus == 16 and resources.gpus_per_rank == 1
    resources.check_fits(16, "actor")
    with pytest.raises(ResourcesError, match=r"rollout engines needs 17 GPUs .* nodes=2 x gpus_per_node=8 = 16"):
        resources.check_fits(17, "rollout engines")


@pytest.mark.parametrize("overrides, named", [
    (dict(nodes=0), "resources.nodes=0"),
    (dict(gpus_per_node=-1), "resources.gpus_per_node=-1"),
    (dict(gpus_per_node=1.5), "resources.gpus_per_node=1.5"),
    (dict(cpus_per_worker=0), "resources.cpus_per_worker=0"),
    (dict(gpu_memory_utilization=1.5), "resources.gpu_memory_utilization=1.5"),
    (dict(gpu_memory_utilization=0), "resources.gpu_memory_utilization=0"),
])
def test_invalid_values_are_named(overrides, named):
    with pytest.raises(ResourcesError, match=named):
        ResourcesConfig(**overrides)
