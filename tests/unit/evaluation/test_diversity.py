"""Edit-distance diversity and distinct-n against hand-computed values and a plain reference DP."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_rlhf.evaluation.diversity import (
    distinct_n,
    edit_diversity,
    group_distinct_n,
    group_edit_diversity,
    levenshtein_distance,
    levenshtein_distances,
    responses_by_group,
)


def _ids(word: str) -> list[int]:
    return [ord(letter) for letter in word]


def _reference_levenshtein(first: list[int], second: list[int]) -> int:
    row = list(range(len(second) + 1))
    for i, a in enumerate(first, start=1):
        previous, row = row, [i] + [0] * len(second)
        for j, b in enumerate(second, start=1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (a != b))
    return row[-1]


@pytest.mark.parametrize(
    ("first", "second", "distance"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("", "abc", 3),
        ("abc", "", 3),
        ("", "", 0),
        ("abc", "abc", 0),
        ("abcdef", "azced", 3),  # b->z, delete d, f->d
        ("intention", "execution", 5),
    ],
)
def test_hand_computed_distances(first: str, second: str, distance: int) -> None:
    assert levenshtein_distance(_ids(first), _ids(second)) == distance
    assert levenshtein_distance(_ids(second), _ids(first)) == distance


def test_batched_distances_match_reference_dp_on_random_pairs() -> None:
    rng = random.Random(0)
    firsts = [[rng.randrange(4) for _ in range(rng.randrange(0, 20))] for _ in range(300)]
    seconds = [[rng.randrange(4) for _ in range(rng.randrange(0, 20))] for _ in range(300)]
    batched = levenshtein_distances(firsts, seconds)
    expected = [_reference_levenshtein(a, b) for a, b in zip(firsts, seconds, strict=True)]
    assert batched.tolist() == expected


def test_group_value_is_mean_of_normalised_pair_distances() -> None:
    group = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 9]]
    # pairs: d=1/len 4 -> 0.25; d=4/len 4 -> 1.0; d=4/len 4 -> 1.0
    assert group_edit_diversity([group]) == [pytest.approx(0.75)]
    assert group_edit_diversity([group], reduction="max") == [pytest.approx(1.0)]


def test_identical_responses_give_zero() -> None:
    response = [5, 6, 7, 8, 9]
    assert edit_diversity([[response] * 8]) == 0.0
    assert edit_diversity([[[], []]]) == 0.0  # two empty responses are identical


def test_disjoint_responses_give_one() -> None:
    assert edit_diversity([[[1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]]]) == pytest.approx(1.0)


def test_groups_of_one_are_excluded_not_zero() -> None:
    disjoint_pair = [[1, 2], [3, 4]]
    assert group_edit_diversity([disjoint_pair, [[7, 7, 7]], []]) == [pytest.approx(1.0), None, None]
    # counted as 0 the mean would be 1/3
    assert edit_diversity([disjoint_pair, [[7, 7, 7]], []]) == pytest.approx(1.0)
    assert edit_diversity([[[1, 2, 3]], [[4]]]) is None
    assert edit_diversity([]) is None


def test_tensor_responses_and_padded_batch_grouping() -> None:
    response_ids = torch.tensor([[1, 2, 3, 0], [1, 2, 0, 0], [4, 5, 6, 7], [9, 0, 0, 0]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    group_index = torch.tensor([1, 1, 0, 2])
    groups = responses_by_group(response_ids, response_mask, group_index)
    assert groups == [[[4, 5, 6, 7]], [[1, 2, 3], [1, 2]], [[9]]]
    # only group 1 has a pair: distance 1 over length 3
    assert edit_diversity(groups) == pytest.approx(1 / 3)
    tensors = [[response_ids[0, :3], response_ids[1, :2]]]
    assert edit_diversity(tensors) == pytest.approx(1 / 3)


def test_full_scale_batch_of_random_responses_is_near_one() -> None:
    generator = torch.Generator().manual_seed(0)
    groups = [[torch.randint(0, 300, (128,), generator=generator) for _ in range(8)] for _ in range(64)]
    # random tokens over 300 ids: almost every aligned position differs
    assert edit_diversity(groups) > 0.95
    collapsed = [[group[0]] * 8 for group in groups]
    assert edit_diversity(collapsed) == 0.0


def test_distinct_n_hand_computed() -> None:
    assert distinct_n([[1, 2, 1, 2]], 1) == pytest.approx(2 / 4)
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # (1,2) (2,1) (1,2)
    assert distinct_n([[1, 2], [1, 2]], 2) == pytest.approx(1 / 2)
    assert distinct_n([[1], [2]], 2) is None  # n-grams never span two responses
    assert group_distinct_n([[[1, 2], [1, 2]], [[3, 4, 5]], [[6]]], 2) == pytest.approx((0.5 + 1.0) / 2)


def test_bad_inputs_raise_naming_the_value() -> None:
    with pytest.raises(ValueError, match="reduction='median'"):
        group_edit_diversity([[[1], [2]]], reduction="median")
    with pytest.raises(ValueError, match="n=0"):
        distinct_n([[1, 2]], 0)
    with pytest.raises(ValueError, match=r"first\[0\].*1-D"):
        levenshtein_distances([[[1, 2]]], [[1]])
    with pytest.raises(ValueError, match="integers"):
        levenshtein_distances([[0.5, 1.5]], [[1]])
