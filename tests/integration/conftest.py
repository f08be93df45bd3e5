"""Set-up shared by the integration tier (real vLLM, Ray, Megatron workers).

``ray_cluster``: one local Ray instance for the whole session, started by the first test that
needs it and shut down at the end, instead of one per test or module. It is always a new local
instance (``address="local"``), never one another user started on this machine, with logical GPUs
for the placement tests. Tests must leave
no actor or placement group behind (they shut their worker groups down), so the next test finds
the cluster as the last one got it; the trainer's own start-up reuses an initialised Ray.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in the test process; the session fixture owns it")
    # 8 logical CPUs and 8 logical GPUs: the largest layouts of the tier (the GPU placement test's
    # 7 disaggregated GPUs). A CPU machine may declare GPUs it lacks: only groups that ask for a
    # GPU are given one (and CUDA_VISIBLE_DEVICES); every CPU run asks for none.
    ray.init(address="local", num_cpus=8, num_gpus=8, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
