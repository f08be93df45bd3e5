"""The load-balanced context-parallel split (2*CP chunks, rank r holds chunks r and 2CP-1-r) and
its inverse, on CPU; and the refusal of CP on a machine without CUDA."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.models.context_parallel import (
    chunk_ids,
    context_parallel_merge,
    context_parallel_split,
    padded_length,
    split_microbatch,
)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_merge_inverts_split(cp):
    tensor = torch.randn(3, 8 * cp, 5)
    parts = [context_parallel_split(tensor, cp, rank) for rank in range(cp)]
    assert all(part.shape == (3, 8, 5) for part in parts)
    assert torch.equal(context_parallel_merge(parts), tensor)


def test_chunks_pair_early_with_late_for_balanced_causal_work():
    positions = torch.arange(16).unsqueeze(0)
    parts = [context_parallel_split(positions, 4, rank)[0].tolist() for rank in range(4)]
    assert parts == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    # causal work of a position is proportional to position + 1: equal on every rank
    assert len({sum(p + 1 for p in part) for part in parts}) == 1
    assert chunk_ids(4, 1) == (1, 6)


def test_split_refuses_lengths_that_are_not_multiples_of_2cp():
    with pytest.raises(ValueError, match="multiple of 2 \\* context_parallel = 4"):
        context_parallel_split(torch.zeros(1, 6), 2, 0)
    assert padded_length(6, 2) == 8 and padded_length(8, 2) == 8


def test_split_microbatch_pads_and_keeps_global_positions():
    ids = torch.arange(1, 6).unsqueeze(0)  # length 5 -> padded to 8 at CP2
    parts = [split_microbatch({"input_ids": ids}, 2, rank) for rank in range(2)]
    assert [part[2] for part in parts] == [5, 5]
    assert parts[0][0].tolist() == [[1, 2, 0, 0]] and parts[0][1].tolist() == [[0, 1, 6, 7]]
    assert parts[1][0].tolist() == [[3, 4, 5, 0]] and parts[1][1].tolist() == [[2, 3, 4, 5]]
    merged = context_parallel_merge([part[1] for part in parts])
    assert merged.tolist() == [list(range(8))]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_context_parallel_is_refused_on_cpu_with_a_clear_error():
    from megatron_rlhf.config.parallel import ParallelConfig, ParallelLayoutError
    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.models.provider import ModelBuildConfig, validate_layout
    from megatron_rlhf.models.tiny import tiny_hf_config

    arch = arch_spec_from_hf_config(tiny_hf_config("llama").to_dict())
    with pytest.raises(ParallelLayoutError, match="context_parallel=2 needs CUDA and Transformer Engine"):
        validate_layout(arch, ParallelConfig(context_parallel=2), ModelBuildConfig())
