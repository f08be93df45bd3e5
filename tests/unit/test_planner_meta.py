"""The planner's parameter count per rank equals the real Megatron-Core model's, at full size.

For GLM-4-9B, Qwen2.5-32B and Qwen3-235B-A22B (the recipes' ``config.json``), this process plays
one rank of a large job (torch's fake process-group backend: Megatron builds the real parallel
groups of that rank, collectives answer locally), builds that rank's ``GPTModel`` stage with the
project's provider under ``torch.device("meta")`` (shapes only, no memory) and compares
``sum(p.numel())`` with :func:`megatron_rlhf.planning.params.stage_parameter_count`, for the
first, a middle and the last pipeline stage and for the LM and scalar-head (critic) roles.
Each case runs in one fresh process that plays its ranks one after the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.parallel.launch import spawn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# (model, layout, world size, ranks to play, role)
CASES = [
    ("glm4-9b", ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 8, (0, 7), "lm"),
    ("glm4-9b", ParallelConfig(tensor_parallel=2), 4, (3,), "value"),
    ("qwen2.5-32b", ParallelConfig(tensor_parallel=8, pipeline_parallel=4), 64, (0, 17, 63), "lm"),
    ("qwen2.5-32b", ParallelConfig(tensor_parallel=8, pipeline_parallel=2), 16, (15,), "reward"),
    ("qwen3-235b-a22b", ParallelConfig(tensor_parallel=4, pipeline_parallel=2, expert_parallel=8,
                                       expert_tensor_parallel=1), 64, (0, 63), "lm"),
]


def _count_on_meta(model: str, parallel: ParallelConfig, world_size: int, rank: int, role: str):
    import os

    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    from megatron.core import parallel_state

    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model
    from megatron_rlhf.parallel.megatron_compat import fake_rank_model_parallel

    arch = arch_spec_from_hf_config(json.loads((EXAMPLES / model / "config.json").read_text()))
    with fake_rank_model_parallel(parallel, world_size, rank):
        stage = parallel_state.get_pipeline_model_parallel_rank()
        with torch.device("meta"):
            built = build_stage_model(arch, parallel, ModelBuildConfig(
                role=role, transformer_impl="local", params_dtype="bfloat16"))
        assert all(p.device.type == "meta" for p in built.parameters())
        return stage, sum(p.numel() for p in built.parameters())


def _play_ranks(model, parallel, world_size, ranks, role):
    return [_count_on_meta(model, parallel, world_size, rank, role) for rank in ranks]


@pytest.mark.parametrize(("model", "parallel", "world_size", "ranks", "role"), CASES,
                         ids=[f"{c[0]}-{c[1].describe()}-{c[4]}" for c in CASES])
def test_planner_params_equal_megatron_model_on_meta(model, parallel, world_size, ranks, role):
    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.planning.layout import PlanLayout
    from megatron_rlhf.planning.params import stage_parameter_count

    arch = arch_spec_from_hf_config(json.loads((EXAMPLES / model / "config.json").read_text()))
    layout = PlanLayout(tensor_parallel=parallel.tensor_parallel, pipeline_parallel=parallel.pipeline_parallel,
                        expert_parallel=parallel.expert_parallel,
                        expert_tensor_parallel=parallel.expert_tensor_parallel,
                        data_parallel=parallel.data_parallel(world_size))
    [played] = spawn(_play_ranks, 1, model, parallel, world_size, ranks, role)
    for rank, (stage, built) in zip(ranks, played):
        assert built == stage_parameter_count(arch, layout, stage, role), (model, rank, stage)
