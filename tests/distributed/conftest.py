"""One pool of persistent gloo ranks for the whole distributed tier.

Every module under tests/distributed/ used to start fresh ranks for each layout, and each rank
imported torch and Megatron-Core again. ``rank_pool`` (package-scoped: started on first use, ended
when the last test of tests/distributed/ is done) keeps four ranks alive and runs each job on the
first ``world_size`` of them; between jobs the ranks tear down Megatron's parallel state and the
process group (see megatron_rlhf/parallel/rank_pool.py), as one process does when it initialises
Megatron for several layouts in turn. A job that fails ends the pool; the next one starts afresh.

Library functions that start their own ranks take a ``launcher`` (the checkpoint tools'
``hf_to_megatron``, ``megatron_to_hf``, ``verify_checkpoint``): tests pass ``rank_pool.run``.
Tests that exercise the launcher or a command itself, that must start from a fresh interpreter,
or that kill their process, keep using ``spawn`` or subprocesses. ``MEGATRON_RLHF_FRESH_RANKS=1``
makes ``rank_pool`` start fresh ranks for every job instead (``spawn``), to tell a test's failure
from a pool effect, or to compare.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest

from megatron_rlhf.parallel.launch import spawn
from megatron_rlhf.parallel.rank_pool import RankPool

POOL_SIZE = 4
"""The largest world a distributed test uses (TP2 x PP2, DP4)."""


class FreshRanks:
    """``rank_pool``'s interface over ``spawn``: fresh processes for every job."""

    def run(self, function: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
        return spawn(function, world_size, *args)


@pytest.fixture(scope="package")
def rank_pool():
    if os.environ.get("MEGATRON_RLHF_FRESH_RANKS") == "1":
        yield FreshRanks()
        return
    with RankPool(POOL_SIZE) as pool:
        yield pool
