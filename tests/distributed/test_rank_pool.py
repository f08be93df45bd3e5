"""The persistent rank pool the distributed tests share: jobs of several world sizes run on the
same processes, each as a real gloo world, and a failing rank ends the pool with its traceback."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_rlhf.parallel.launch import DistributedLaunchError
from megatron_rlhf.parallel.rank_pool import RankPool


def _all_reduce_job(value: int) -> dict:
    torch.distributed.init_process_group("gloo")
    tensor = torch.tensor([value * (torch.distributed.get_rank() + 1)])
    torch.distributed.all_reduce(tensor)
    os.environ["LEFT_BY_A_JOB"] = "1"
    return {"pid": os.getpid(), "rank": int(os.environ["RANK"]), "world": torch.distributed.get_world_size(),
            "sum": int(tensor.item())}


def _patching_job() -> None:
    torch.distributed.broadcast = None  # as a test that forbids a collective does


def _state_job() -> dict:
    return {"pid": os.getpid(), "initialized": torch.distributed.is_initialized(),
            "left": os.environ.get("LEFT_BY_A_JOB"), "broadcast": callable(torch.distributed.broadcast)}


def _failing_job() -> None:
    if int(os.environ["RANK"]) == 1:
        raise ValueError("rank 1 refuses")
    torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()  # waits for rank 1, which never comes: the pool must end it


def test_jobs_of_several_sizes_share_the_processes():
    with RankPool(3) as pool:
        three = pool.run(_all_reduce_job, 3, 5)
        two = pool.run(_all_reduce_job, 2, 7)
        pool.run(_patching_job, 3)
        after = pool.run(_state_job, 3)
        assert pool.starts == 1 and pool.jobs_run == 4
    assert [r["rank"] for r in three] == [0, 1, 2] and {r["world"] for r in three} == {3}
    assert {r["sum"] for r in three} == {5 * (1 + 2 + 3)}
    assert {r["sum"] for r in two} == {7 * (1 + 2)} and {r["world"] for r in two} == {2}
    assert [r["pid"] for r in two] == [r["pid"] for r in three[:2]]
    assert [r["pid"] for r in after] == [r["pid"] for r in three]
    assert not any(r["initialized"] for r in after)
    assert all(r["left"] is None and r["broadcast"] for r in after)


def test_a_failing_rank_ends_the_pool_and_the_next_job_starts_afresh():
    with RankPool(2, timeout_seconds=120) as pool:
        first = pool.run(_state_job, 2)
        with pytest.raises(DistributedLaunchError, match="rank 1 refuses"):
            pool.run(_failing_job, 2)
        again = pool.run(_all_reduce_job, 2, 1)
        assert pool.starts == 2
    assert {r["sum"] for r in again} == {3}
    assert not {r["pid"] for r in again} & {r["pid"] for r in first}


def test_world_size_beyond_the_pool_is_refused():
    with RankPool(1) as pool, pytest.raises(ValueError, match="1..1"):
        pool.run(_state_job, 2)
