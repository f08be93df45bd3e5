"""How packed segments are batched into SDPA calls (megatron_rlhf.models.packed_attention).

Every non-empty segment is in exactly one group; short segments (RL responses) share one call;
long segments of different lengths get calls of their own, so no group computes more than the
padding ratio times its segments' own attention positions plus the allowance for the calls saved.
A plan's gathers give back every packed token, and its gradient, in packed order; non-causal
plans never batch. (Exactness with real attention: tests/distributed/test_packing_equivalence.py.)
"""

from __future__ import annotations

import random

import pytest

from megatron_rlhf.models.packed_attention import SEGMENT_CALL_POSITIONS, segment_groups


def test_short_segments_share_one_call():
    assert segment_groups([5, 1, 7, 3]) == [[2, 0, 3, 1]]


def test_long_segments_of_different_lengths_get_their_own_calls():
    assert segment_groups([100, 5, 90, 1, 64, 70]) == [[0, 2, 5], [4, 1, 3]]
    assert segment_groups([4096, 1024, 4000]) == [[0, 2], [1]]


def test_empty_segments_are_left_out():
    assert segment_groups([0, 3, 0, 2]) == [[1, 3]]
    assert segment_groups([]) == []


@pytest.mark.parametrize("seed", range(5))
def test_every_segment_once_and_the_padding_is_bounded(seed):
    generator = random.Random(seed)
    lengths = [generator.choice([0, generator.randint(1, 40), generator.randint(200, 3000)]) for _ in range(60)]
    groups = segment_groups(lengths, padding_ratio=1.25)
    assert sorted(i for group in groups for i in group) == [i for i, length in enumerate(lengths) if length]
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert all(longest ** 2 <= 1.25 * lengths[i] ** 2 + SEGMENT_CALL_POSITIONS for i in group)


def test_a_padding_ratio_below_one_is_refused():
    with pytest.raises(ValueError, match="padding_ratio=0.5"):
        segment_groups([3], padding_ratio=0.5)


@pytest.mark.parametrize("lengths", [(5, 1, 7, 3), (100, 5, 90, 1, 64, 70), (3, 0, 4)])
@pytest.mark.parametrize("batched", [True, False])
def test_pad_unpad_and_order_give_back_every_token_and_its_gradient(lengths, batched):
    """Through a plan with an identity in place of attention, the packed rows come back in packed
    order, and so does the gradient (the backward gathers route each row's gradient home)."""
    import torch

    from megatron_rlhf.models.packed_attention import packed_attention_plan

    bounds = tuple(torch.tensor((0,) + lengths).cumsum(0).tolist())
    plan = packed_attention_plan(bounds, batched=batched)
    if not batched:
        assert all(group.count == 1 for group in plan.groups)
    packed = torch.randn(bounds[-1], 3, requires_grad=True)
    grouped = [group.unpad(group.pad(packed)) for group in plan.groups]
    restored = plan.restore_order(torch.cat(grouped))
    assert torch.equal(restored, packed)
    upstream = torch.randn_like(packed)
    restored.backward(upstream)
    assert torch.equal(packed.grad, upstream)


def test_the_padding_of_a_segment_repeats_its_first_token():
    import torch

    from megatron_rlhf.models.packed_attention import packed_attention_plan

    (group,) = packed_attention_plan((0, 3, 4)).groups
    assert (group.count, group.longest) == (2, 3)
    assert group.pad.index.tolist() == [0, 1, 2, 3, 3, 3]
    assert group.unpad.index.tolist() == [0, 1, 2, 3]
    # every packed token is in this one group (its gradient needs no zero row); two padded
    # positions take none
    assert (group.pad.zero_row, group.unpad.zero_row) == (False, True)
