"""How packed segments are batched into SDPA calls (megatron_rlhf.models.sdpa_attention.segment_groups).

Every non-empty segment is in exactly one group; short segments (RL responses) share one call;
long segments of different lengths get calls of their own, so no group computes more than the
padding ratio times its segments' own attention positions plus the allowance for the calls saved.
"""

from __future__ import annotations

import random

import pytest

from megatron_rlhf.models.sdpa_attention import SEGMENT_CALL_POSITIONS, segment_groups


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
