"""Data-parallel dispatch (pure parts): token-balanced shares that keep minibatch boundaries,
the cut of a rollout batch, the reassembly in batch order, and the recompute / uneven-pipeline
fields of ParallelConfig with their mapping onto Megatron's TransformerConfig."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig, ParallelLayoutError
from megatron_rlhf.parallel.data_dispatch import (
    RankLayout,
    balanced_shards,
    output_ranks,
    reassemble,
    select_rollout,
)


def test_shares_are_balanced_by_tokens_not_only_by_count():
    tokens = [100, 90, 10, 5, 80, 20, 15, 12]
    shards = balanced_shards(tokens, 2)
    assert sorted(sum(shards, [])) == list(range(8))
    assert [len(shard) for shard in shards] == [4, 4]
    loads = [sum(tokens[i] for i in shard) for shard in shards]
    # the best split of 4 + 4 (100 must go with three of the small ones); halves would be 205 / 127
    assert sorted(loads) == [147, 185]
    assert balanced_shards(tokens, 2) == shards  # deterministic


def test_swaps_fix_what_equal_counts_leave_unbalanced():
    tokens = [10, 9, 8, 7, 1, 1]  # longest-first with 3 slots: [10, 7, 1] / [9, 8, 1] -> swaps narrow it
    loads = sorted(sum(tokens[i] for i in shard) for shard in balanced_shards(tokens, 2))
    assert loads == [18, 18]


def test_each_minibatch_is_split_on_its_own():
    tokens = [9, 1, 8, 2, 7, 3, 6, 4]
    shards = balanced_shards(tokens, 2, groups=2)
    for rank_share in shards:
        first, second = rank_share[:2], rank_share[2:]
        assert all(i < 4 for i in first) and all(i >= 4 for i in second)
    assert sorted(shards[0][:2] + shards[1][:2]) == [0, 1, 2, 3]


def test_shares_that_cannot_be_equal_are_refused():
    with pytest.raises(ValueError, match="6 samples does not split into 2 minibatches of 2"):
        balanced_shards([1] * 6, 2, groups=2)


def test_select_and_reassemble_round_trip():
    from megatron_rlhf.types import RolloutBatch

    count = 6
    batch = RolloutBatch(
        prompt_ids=torch.arange(count * 3).reshape(count, 3),
        prompt_lengths=torch.tensor([3, 2, 1, 3, 2, 1]),
        response_ids=torch.arange(count * 4).reshape(count, 4),
        response_mask=torch.ones(count, 4),
        sampling_logprobs=torch.zeros(count, 4),
        finish_reasons=[str(i) for i in range(count)],
        group_index=torch.arange(count),
        prompt_index=torch.arange(count),
        pad_token_id=0,
        response_texts=[f"text {i}" for i in range(count)],
    )
    shards = balanced_shards((batch.prompt_lengths + 4).tolist(), 3)
    parts = [select_rollout(batch, shard) for shard in shards]
    assert [part.finish_reasons for part in parts] == [[str(i) for i in shard] for shard in shards]
    assert [part.response_texts for part in parts] == [[f"text {i}" for i in shard] for shard in shards]
    assert torch.equal(reassemble([part.response_ids for part in parts], shards), batch.response_ids)


def test_output_ranks_one_per_replica():
    layouts = [RankLayout(r, r // 2, 2, r % 2 == 0) for r in range(4)]  # TP2 x DP2
    assert [layout.rank for layout in output_ranks(layouts)] == [0, 2]
    with pytest.raises(ValueError, match="one output rank per DP replica"):
        output_ranks([RankLayout(r, r // 2, 2, True) for r in range(4)])


def test_recompute_and_uneven_pipeline_fields_are_validated():
    with pytest.raises(ParallelLayoutError, match="recompute_granularity='full' needs recompute_method"):
        ParallelConfig(recompute_granularity="full")
    with pytest.raises(ParallelLayoutError, match="apply only to recompute_granularity='full'"):
        ParallelConfig(recompute_granularity="selective", recompute_num_layers=1)
    with pytest.raises(ParallelLayoutError, match="needs pipeline_parallel > 1"):
        ParallelConfig(num_layers_in_first_pipeline_stage=1)
    assert ParallelConfig(pipeline_parallel=2, num_layers_in_first_pipeline_stage=1).stage_layers(4) == [1, 3]
    assert ParallelConfig(pipeline_parallel=3, num_layers_in_last_pipeline_stage=2).stage_layers(6) == [2, 2, 2]
    with pytest.raises(ParallelLayoutError, match="must split evenly"):
        ParallelConfig(pipeline_parallel=3, num_layers_in_first_pipeline_stage=1).stage_layers(6)


@pytest.mark.parametrize(
    "parallel, expected",
    [
        (ParallelConfig(recompute_granularity="selective"),
         dict(recompute_granularity="selective", recompute_method=None, recompute_modules=["core_attn"])),
        (ParallelConfig(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
         dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
        (ParallelConfig(pipeline_parallel=2, num_layers_in_first_pipeline_stage=1),
         dict(num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=None)),
        (ParallelConfig(tensor_parallel=2, sequence_parallel=True), dict(sequence_parallel=True)),
    ],
)
def test_fields_map_onto_transformer_config(parallel, expected):
    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.models.provider import ModelBuildConfig, transformer_config
    from megatron_rlhf.models.tiny import tiny_hf_config

    arch = arch_spec_from_hf_config(tiny_hf_config("llama").to_dict())
    config = transformer_config(arch, parallel, ModelBuildConfig(), "local")
    assert {name: getattr(config, name) for name in expected} == expected
