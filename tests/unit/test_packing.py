"""Token-budget micro-batch planning and packed (THD) rows (megatron_rlhf.models.packing), on CPU.

One property per test: every sample lands in exactly one micro-batch; the budget holds except for
a sample longer than it (alone then); no two micro-batches fit the budget together (first fit); the plan is deterministic and ordered; without a budget it
is fixed groups of ``micro_batch_size``; a packed row holds each sequence's tokens with positions
restarting at 0, ``cu_seqlens`` marking the sequences and a tail segment of padding, read
positions moved into the row; a common row length pads every row alike; the config refuses a
budget without packing, naming the key.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_rlhf.models.packing import (
    pack_microbatch,
    packed_microbatches,
    padding_fraction,
    token_budget_microbatches,
)


def _random_lengths(seed: int, count: int = 40) -> list[int]:
    generator = random.Random(seed)
    return [generator.randint(1, 30) for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
def test_every_sample_is_in_exactly_one_microbatch(seed):
    lengths = _random_lengths(seed)
    plan = token_budget_microbatches(lengths, 40, 1)
    assert sorted(index for members in plan for index in members) == list(range(len(lengths)))


@pytest.mark.parametrize("seed", range(5))
def test_the_budget_holds_except_for_a_lone_oversize_sample(seed):
    lengths = _random_lengths(seed) + [55]
    for members in token_budget_microbatches(lengths, 40, 1):
        assert sum(lengths[i] for i in members) <= 40 or len(members) == 1


def test_no_two_microbatches_could_be_merged_within_the_budget():
    """First fit: a bin's first sample did not fit any earlier bin, so any two bins overflow
    together (hence fewer than twice the lower bound ``sum / budget`` bins)."""
    lengths = _random_lengths(11, 200)
    loads = [sum(lengths[i] for i in members) for members in token_budget_microbatches(lengths, 64, 1)]
    assert all(a + b > 64 for index, a in enumerate(loads) for b in loads[index + 1:])


def test_the_plan_is_sorted_and_deterministic():
    lengths = _random_lengths(3)
    plan = token_budget_microbatches(lengths, 50, 1)
    assert plan == token_budget_microbatches(list(lengths), 50, 1)
    assert all(members == sorted(members) for members in plan)
    assert [members[0] for members in plan] == sorted(members[0] for members in plan)


def test_no_budget_gives_consecutive_groups_of_micro_batch_size():
    assert token_budget_microbatches([3, 1, 4, 1, 5], 0, 2) == [[0, 1], [2, 3], [4]]


def test_a_packed_row_holds_each_sequence_with_restarting_positions_and_a_tail_segment():
    input_ids = torch.tensor([[11, 12, 13, 0], [21, 22, 0, 0], [31, 32, 33, 34]])
    lengths = torch.tensor([3, 2, 4])
    positions = torch.tensor([[1, 2], [0, 1], [2, 3]])
    packed = pack_microbatch(input_ids, lengths, positions, torch.tensor([0, 2]), multiple=4)
    assert packed["input_ids"].tolist() == [[11, 12, 13, 31, 32, 33, 34, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    params = packed["packed_seq_params"]
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 3, 7, 8]
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == 4
    assert packed["positions"].tolist() == [[1, 2], [5, 6]]
    assert (packed["real_tokens"], packed["computed_tokens"]) == (7, 8)
    assert padding_fraction(7, 8) == pytest.approx(1 / 8)


def test_a_common_row_length_pads_every_row_to_the_longest():
    input_ids = torch.arange(1, 13).reshape(3, 4)
    lengths = torch.tensor([4, 1, 3])
    positions = torch.zeros(3, 2, dtype=torch.long)
    rows = packed_microbatches(input_ids, lengths, positions, [[0], [1, 2]], multiple=2, common_length=True)
    assert [row["input_ids"].shape[1] for row in rows] == [4, 4]
    assert rows[0]["packed_seq_params"].cu_seqlens_q.tolist() == [0, 4]
    assert rows[1]["packed_seq_params"].cu_seqlens_q.tolist() == [0, 1, 4]


def test_a_row_that_cannot_hold_its_tokens_is_refused():
    with pytest.raises(ValueError, match="row_length=3"):
        pack_microbatch(torch.ones(2, 4, dtype=torch.long), torch.tensor([2, 2]), torch.zeros(2, 1, dtype=torch.long),
                        torch.tensor([0, 1]), row_length=3)


def test_a_token_budget_without_packing_is_refused_by_name():
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig

    with pytest.raises(ValueError, match="max_tokens_per_microbatch=64 needs packing: true"):
        PPOUpdateConfig(max_tokens_per_microbatch=64)
    with pytest.raises(ValueError, match="max_tokens_per_microbatch=-1"):
        PPOUpdateConfig(packing=True, max_tokens_per_microbatch=-1)
    assert PPOUpdateConfig(packing=True, max_tokens_per_microbatch=64).max_tokens_per_microbatch == 64
