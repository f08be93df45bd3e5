"""REINFORCE++ returns-to-go and batch whitening against list-based references."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.algorithms import (
    discounted_returns,
    reinforce_pp_advantages,
    whiten_over_tokens,
)

from . import references
from .batches import mask_from_lengths, random_lengths, random_tokens, to_rows

EXACT64 = {"rtol": 1e-10, "atol": 1e-12}


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_matches_reference_on_random_batches(gamma: float) -> None:
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        lengths = random_lengths(generator, 5, 10)
        mask = mask_from_lengths(lengths, 10)
        rewards = random_tokens(generator, mask)
        returns_rows = [references.returns_to_go(row, gamma) for row in to_rows(rewards, lengths)]
        flat = references.whiten([v for row in returns_rows for v in row], 1e-6)
        expected_rows, start = [], 0
        for length in lengths:
            expected_rows.append(flat[start : start + length])
            start += length
        expected_returns = torch.tensor(references.pad_rows(returns_rows, 10), dtype=torch.float64)
        expected = torch.tensor(references.pad_rows(expected_rows, 10), dtype=torch.float64)
        torch.testing.assert_close(
            discounted_returns(rewards, mask, gamma), expected_returns, **EXACT64
        )
        torch.testing.assert_close(
            reinforce_pp_advantages(rewards, mask, gamma=gamma), expected, **EXACT64
        )


def test_hand_computed_returns() -> None:
    rewards = torch.tensor([[1.0, 2.0, 4.0, 99.0]], dtype=torch.float64)
    returns = discounted_returns(rewards, mask_from_lengths([3], 4), 0.5)
    assert returns.tolist() == [[1.0 + 1.0 + 1.0, 2.0 + 2.0, 4.0, 0.0]]


def test_whitening_has_zero_mean_unit_unbiased_std() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = mask_from_lengths([7, 3, 0, 5], 8)
    whitened = whiten_over_tokens(random_tokens(generator, mask, scale=4.0), mask, eps=1e-12)
    tokens = whitened[mask]
    assert abs(tokens.mean().item()) < 1e-12
    assert abs(tokens.std().item() - 1.0) < 1e-10


@pytest.mark.parametrize("lengths", [[0, 0], [1, 0], [3, 3]])
def test_degenerate_batches_give_exact_zero(lengths: list[int]) -> None:
    mask = mask_from_lengths(lengths, 3)
    constant = torch.full((2, 3), float("nan")).masked_fill(mask, 0.3)
    assert torch.equal(whiten_over_tokens(constant, mask), torch.zeros(2, 3))
