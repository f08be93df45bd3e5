"""GRPO and RLOO advantages and the group helpers against list-based references and hand cases."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.algorithms import (
    NonFiniteError,
    contiguous_group_index,
    group_moments,
    grpo_advantages,
    rloo_advantages,
)

from . import references
from .batches import mask_from_lengths, random_groups

EXACT64 = {"rtol": 1e-10, "atol": 1e-12}


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_grpo_matches_reference_on_random_groups(normalize_std: bool, eps: float) -> None:
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        batch = int(torch.randint(1, 20, (1,), generator=generator))
        groups = random_groups(generator, batch, num_groups=4)
        rewards = torch.randn(batch, generator=generator, dtype=torch.float64)
        expected = references.grpo(rewards.tolist(), groups.tolist(), normalize_std, eps)
        actual = grpo_advantages(rewards, groups, normalize_std=normalize_std, eps=eps)
        torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), **EXACT64)


def test_rloo_matches_reference_on_random_groups() -> None:
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        batch = int(torch.randint(1, 20, (1,), generator=generator))
        groups = random_groups(generator, batch, num_groups=5)
        rewards = torch.randn(batch, generator=generator, dtype=torch.float64)
        expected = references.rloo(rewards.tolist(), groups.tolist())
        actual = rloo_advantages(rewards, groups)
        torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), **EXACT64)


def test_grpo_hand_computed_uses_unbiased_std() -> None:
    # group {1, 0}: mean 0.5, unbiased std sqrt(0.5); group {2, 2, 5}: mean 3, std sqrt(3).
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1])
    expected = torch.tensor(
        [0.5 / 0.5**0.5, -0.5 / 0.5**0.5, -1 / 3**0.5, -1 / 3**0.5, 2 / 3**0.5], dtype=torch.float64
    )
    actual = grpo_advantages(rewards, groups, eps=1e-12)
    torch.testing.assert_close(actual, expected, **EXACT64)


def test_rloo_hand_computed() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    actual = rloo_advantages(rewards, torch.tensor([4, 4, 4]))
    torch.testing.assert_close(actual, torch.tensor([-1.5, 0.0, 1.5], dtype=torch.float64))


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_single_sample_groups_get_exactly_zero(estimator) -> None:
    rewards = torch.tensor([3.0, -7.0, 0.25])
    advantages = estimator(rewards, torch.tensor([0, 1, 2]))
    assert torch.equal(advantages, torch.zeros(3))


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_constant_reward_groups_get_exactly_zero(estimator) -> None:
    # 0.1 is not representable: a naive mean leaves a residue that / eps would blow up.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7], dtype=torch.float32)
    advantages = estimator(rewards, torch.tensor([0, 0, 0, 1, 1]))
    assert torch.equal(advantages, torch.zeros(5))


def test_non_contiguous_groups_equal_contiguous_layout_after_permutation() -> None:
    generator = torch.Generator().manual_seed(3)
    rewards = torch.randn(12, generator=generator, dtype=torch.float64)
    contiguous = contiguous_group_index(3, 4)
    permutation = torch.randperm(12, generator=generator)
    shuffled = grpo_advantages(rewards[permutation], contiguous[permutation])
    torch.testing.assert_close(
        shuffled, grpo_advantages(rewards, contiguous)[permutation], **EXACT64
    )


def test_broadcast_to_response_tokens() -> None:
    mask = mask_from_lengths([2, 0, 3], 3)
    advantages = rloo_advantages(
        torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 0]), response_mask=mask
    )
    expected = torch.tensor([[-3.0, -3.0, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    assert torch.equal(advantages, expected)


def test_contiguous_group_index_layout() -> None:
    assert contiguous_group_index(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert contiguous_group_index(0, 4).tolist() == []


def test_group_moments_count_and_mean() -> None:
    moments = group_moments(torch.tensor([1.0, 2.0, 10.0]), torch.tensor([5, 9, 5]))
    assert moments.count.tolist() == [2, 1, 2]
    assert moments.mean.tolist() == [5.5, 2.0, 5.5]
    assert moments.std[1].item() == 0.0


def test_empty_batch() -> None:
    assert grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_non_finite_reward_raises_naming_rewards() -> None:
    with pytest.raises(NonFiniteError, match=r"rewards .* index 1"):
        grpo_advantages(torch.tensor([0.0, float("inf")]), torch.tensor([0, 0]))


def test_float_group_index_is_rejected() -> None:
    with pytest.raises(ValueError, match="group_index must be an integer tensor"):
        grpo_advantages(torch.zeros(2), torch.zeros(2))
