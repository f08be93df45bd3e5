"""Set-up shared by the integration tier (real vLLM, Ray, Megatron workers).

``ray_cluster``: one local Ray instance for the whole session, started by the first test that
needs it and shut down at the end, instead of one per test or module. It is always a new local
instance (``address="local"``), never one another user started on this machine. Tests must leave
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
    # 4 logical CPUs: the largest layout of the tier (actor, reference and two engines, disaggregated)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
