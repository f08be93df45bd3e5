"""GAE (megatron_rlhf.algorithms.gae) against a per-token double loop and hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.algorithms import AlgorithmConfigError, NonFiniteError, gae_advantages

from . import references
from .batches import mask_from_lengths, random_lengths, random_tokens, to_rows

# float64 inputs vs the double-precision reference: only summation order differs.
EXACT64 = {"rtol": 1e-10, "atol": 1e-12}
# float32 inputs vs the double-precision reference: a few fp32 ulps accumulated over T <= 16 steps.
FP32 = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize(
    "gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (0.0, 0.7)]
)
def test_matches_reference_on_random_batches(gamma: float, lam: float) -> None:
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        lengths = random_lengths(generator, 6, 12)
        mask = mask_from_lengths(lengths, 12)
        rewards = random_tokens(generator, mask)
        values = random_tokens(generator, mask)
        advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
        expected = [
            references.gae(r, v, gamma, lam)
            for r, v in zip(to_rows(rewards, lengths), to_rows(values, lengths))
        ]
        expected_adv = torch.tensor(
            references.pad_rows([a for a, _ in expected], 12), dtype=torch.float64
        )
        expected_ret = torch.tensor(
            references.pad_rows([r for _, r in expected], 12), dtype=torch.float64
        )
        torch.testing.assert_close(advantages, expected_adv, **EXACT64)
        torch.testing.assert_close(returns, expected_ret, **EXACT64)


def test_float32_inputs_give_float32_close_to_double_reference() -> None:
    generator = torch.Generator().manual_seed(7)
    lengths = random_lengths(generator, 5, 16)
    mask = mask_from_lengths(lengths, 16)
    rewards = random_tokens(generator, mask, dtype=torch.float32)
    values = random_tokens(generator, mask, dtype=torch.float32)
    advantages, _ = gae_advantages(rewards, values, mask, 0.99, 0.95)
    assert advantages.dtype == torch.float32
    expected = [
        references.gae(r, v, 0.99, 0.95)[0]
        for r, v in zip(to_rows(rewards.double(), lengths), to_rows(values.double(), lengths))
    ]
    torch.testing.assert_close(
        advantages.double(),
        torch.tensor(references.pad_rows(expected, 16), dtype=torch.float64),
        **FP32,
    )


def test_hand_computed_monte_carlo_case() -> None:
    # gamma = lambda = 1: A_t = (sum of remaining rewards) - V_t, returns = 1 everywhere.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(
        advantages, torch.tensor([[0.5, 0.4, 0.3, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64))


def test_hand_computed_td0_case() -> None:
    # lambda = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t, V after the last token is 0.
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    advantages, _ = gae_advantages(rewards, values, torch.ones(1, 3), 0.5, 0.0)
    expected = [[0.5 * 0.6 - 0.5, 0.5 * 0.7 - 0.6, 1.0 - 0.7]]
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float64))


def test_padding_values_never_leak() -> None:
    mask = mask_from_lengths([3, 0, 1], 4)
    rewards = torch.full((3, 4), float("nan"), dtype=torch.float64).masked_fill(mask, 1.0)
    values = torch.full((3, 4), float("inf"), dtype=torch.float64).masked_fill(mask, 0.25)
    advantages, returns = gae_advantages(rewards, values, mask, 1.0, 0.9)
    assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()
    assert (advantages[1] == 0).all()


def test_zero_width_batch() -> None:
    advantages, returns = gae_advantages(
        torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0), 1.0, 1.0
    )
    assert advantages.shape == (2, 0) and returns.shape == (2, 0)


def test_non_finite_value_at_response_token_raises_naming_it() -> None:
    values = torch.zeros(2, 3)
    values[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"values .* index \(1, 2\)"):
        gae_advantages(torch.zeros(2, 3), values, torch.ones(2, 3), 1.0, 1.0)


@pytest.mark.parametrize("gamma,lam", [(1.5, 0.9), (0.9, -0.1)])
def test_discounts_outside_unit_interval_raise(gamma: float, lam: float) -> None:
    with pytest.raises(AlgorithmConfigError, match="must be in \\[0, 1\\]"):
        gae_advantages(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), gamma, lam)
