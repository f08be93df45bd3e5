"""Where a vLLM engine runs (``RolloutConfig.engine_process``) and the eager token-rank count of
CPU engines: choices and arithmetic that need no engine (the in-process engine itself:
``tests/integration/test_engine_in_process.py``)."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.errors import UserError
from megatron_rlhf.config.rollout import RolloutConfig
from megatron_rlhf.rollout.engine_in_process import (
    EngineProcessUnavailable,
    in_process_obstacle,
    resolve_engine_process,
)
from megatron_rlhf.rollout.sampler_rank import count_at_least


@pytest.mark.parametrize("world", [None, 1])
def test_auto_runs_a_one_worker_cpu_engine_in_this_process(world):
    assert resolve_engine_process("auto", on_gpu=False, tensor_parallel=1, process_world_size=world) == "in_process"
    assert resolve_engine_process("in_process", False, 1, world) == "in_process"
    assert resolve_engine_process("separate", False, 1, world) == "separate"


@pytest.mark.parametrize("on_gpu,tensor_parallel,world,reason", [
    (True, 1, None, "GPU engines"),
    (False, 2, None, "tensor_parallel=2"),
    (False, 1, 4, "one of 4 torch.distributed ranks"),
])
def test_auto_falls_back_to_separate_processes_and_in_process_is_refused_with_the_reason(
        on_gpu, tensor_parallel, world, reason):
    assert reason in in_process_obstacle(on_gpu, tensor_parallel, world)
    assert resolve_engine_process("auto", on_gpu, tensor_parallel, world) == "separate"
    assert resolve_engine_process("separate", on_gpu, tensor_parallel, world) == "separate"
    with pytest.raises(EngineProcessUnavailable, match="engine_process=in_process: .*" + reason) as raised:
        resolve_engine_process("in_process", on_gpu, tensor_parallel, world)
    assert isinstance(raised.value, UserError)


def test_an_unknown_engine_process_is_refused_by_the_config():
    with pytest.raises(ValueError, match="engine_process='threads'"):
        RolloutConfig(model_dir="m", engine_process="threads")


def test_eager_token_ranks_count_the_entries_at_least_as_likely():
    """The rank vLLM reports for a sampled token: entries of its row >= its log-prob (ties
    included, so the token counts itself). Checked against a per-row loop on random rows with ties."""
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.randint(-20, 0, (37, 500), generator=generator).float() / 4
    sampled = torch.randint(0, 500, (37,), generator=generator)
    values = logprobs.gather(-1, sampled.unsqueeze(-1))
    expected = torch.tensor([sum(1 for entry in row.tolist() if entry >= value)
                             for row, value in zip(logprobs, values.squeeze(-1).tolist())])
    ranks = count_at_least(logprobs, values)
    assert ranks.dtype == torch.int64 and torch.equal(ranks, expected)
    assert bool((ranks >= 1).all())
