"""Reward clipping, group/batch normalisation and asymmetric shrinking."""

from __future__ import annotations

import statistics

import pytest
import torch

from megatron_rlhf.algorithms import (
    REWARD_NORMALIZATIONS,
    AlgorithmConfigError,
    NonFiniteError,
    asymmetric_shrink,
    clip_rewards,
    normalize_in_batch,
    normalize_in_groups,
)

from . import references
from .batches import random_groups

EXACT64 = {"rtol": 1e-10, "atol": 1e-12}


def test_registry_keys() -> None:
    assert REWARD_NORMALIZATIONS.names() == ("none", "group", "batch", "domain")


def test_clip_hand_computed() -> None:
    rewards = torch.tensor([-12.0, -1.0, 0.0, 3.5, 40.0])
    assert clip_rewards(rewards, -5.0, 5.0).tolist() == [-5.0, -1.0, 0.0, 3.5, 5.0]


@pytest.mark.parametrize("low,high", [(1.0, 1.0), (2.0, -2.0), (float("-inf"), 1.0)])
def test_clip_rejects_bad_range(low: float, high: float) -> None:
    with pytest.raises(AlgorithmConfigError, match="low < high"):
        clip_rewards(torch.zeros(2), low, high)


def test_group_normalisation_matches_reference() -> None:
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        groups = random_groups(generator, 16, num_groups=3)
        rewards = 3.0 * torch.randn(16, generator=generator, dtype=torch.float64) + 1.0
        expected = references.grpo(rewards.tolist(), groups.tolist(), True, 1e-6)
        torch.testing.assert_close(
            normalize_in_groups(rewards, groups),
            torch.tensor(expected, dtype=torch.float64),
            **EXACT64,
        )


def test_batch_normalisation_matches_unbiased_statistics() -> None:
    rewards = [0.5, 2.0, -1.0, 4.0, 4.0]
    mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
    expected = torch.tensor([(r - mean) / (std + 1e-6) for r in rewards], dtype=torch.float64)
    torch.testing.assert_close(
        normalize_in_batch(torch.tensor(rewards, dtype=torch.float64)), expected, **EXACT64
    )


def test_batch_normalisation_of_one_sample_or_constants_is_zero() -> None:
    assert torch.equal(normalize_in_batch(torch.tensor([5.0])), torch.zeros(1))
    assert torch.equal(normalize_in_batch(torch.full((4,), 0.3)), torch.zeros(4))


def test_shrink_hand_computed() -> None:
    rewards = torch.tensor([-2.0, -0.5, 0.0, 1.5])
    assert asymmetric_shrink(rewards, 0.5).tolist() == [-1.0, -0.25, 0.0, 1.5]
    assert torch.equal(asymmetric_shrink(rewards, 1.0), rewards)


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.5])
def test_shrink_rejects_alpha_outside_unit_interval(alpha: float) -> None:
    with pytest.raises(AlgorithmConfigError, match=f"alpha must be in \\(0, 1\\]; got {alpha}"):
        asymmetric_shrink(torch.zeros(1), alpha)


def test_nan_reward_raises_naming_rewards() -> None:
    with pytest.raises(NonFiniteError, match=r"rewards .* index 2"):
        clip_rewards(torch.tensor([0.0, 1.0, float("nan")]), -1.0, 1.0)
