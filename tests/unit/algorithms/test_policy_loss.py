"""PPO clipped surrogate (low/high clip, dual clip) against a per-token scalar reference."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlhf.algorithms import (
    AlgorithmConfigError,
    NonFiniteError,
    ppo_policy_loss,
    token_mean,
)

from . import references
from .batches import mask_from_lengths, random_lengths, random_tokens, to_rows

EXACT64 = {"rtol": 1e-12, "atol": 1e-14}
CLIP_SETTINGS = [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.3, 3.0), (0.0, 0.0, 1.5)]


def _random_case(seed: int, width: int = 9):
    generator = torch.Generator().manual_seed(seed)
    lengths = random_lengths(generator, 6, width)
    mask = mask_from_lengths(lengths, width)
    old_logprobs = random_tokens(generator, mask, scale=0.5) - 1.0
    logprobs = old_logprobs + random_tokens(generator, mask, scale=0.4)
    advantages = random_tokens(generator, mask)
    return lengths, mask, logprobs, old_logprobs, advantages


@pytest.mark.parametrize("low,high,dual", CLIP_SETTINGS)
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_matches_reference_on_random_batches(low, high, dual, reduction) -> None:
    for seed in range(10):
        lengths, mask, logprobs, old_logprobs, advantages = _random_case(seed)
        output = ppo_policy_loss(
            logprobs, old_logprobs, advantages, mask, low, high, dual, reduction
        )
        rows = [
            [references.ppo_token_loss(a, b, c, low, high, dual) for a, b, c in zip(lp, ol, ad)]
            for lp, ol, ad in zip(
                to_rows(logprobs, lengths),
                to_rows(old_logprobs, lengths),
                to_rows(advantages, lengths),
            )
        ]
        expected_tokens = torch.tensor(references.pad_rows(rows, 9), dtype=torch.float64)
        torch.testing.assert_close(output.token_loss, expected_tokens, **EXACT64)
        assert output.loss.item() == pytest.approx(
            references.reduce(rows, reduction), rel=1e-12, abs=1e-14
        )


def test_hand_computed_tokens() -> None:
    # ratio 1.5, A=+1 -> clipped at 1.2; ratio 0.5, A=-1 -> clipped at 0.8;
    # ratio 10, A=-1 -> unclipped 10, dual clip c=3 caps at 3; ratio 1.1, A=+2 -> unclipped 2.2.
    ratios = torch.tensor([[1.5, 0.5, 10.0, 1.1]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    old_logprobs = torch.full((1, 4), -2.0, dtype=torch.float64)
    output = ppo_policy_loss(
        old_logprobs + ratios.log(),
        old_logprobs,
        advantages,
        torch.ones(1, 4),
        0.2,
        0.2,
        dual_clip=3.0,
    )
    torch.testing.assert_close(
        output.token_loss, torch.tensor([[-1.2, 0.8, 3.0, -2.2]], dtype=torch.float64)
    )
    assert output.metrics.clip_fraction.item() == pytest.approx(2 / 4)
    assert output.metrics.dual_clip_fraction.item() == pytest.approx(1 / 4)
    assert output.metrics.ratio_min.item() == pytest.approx(0.5)
    assert output.metrics.ratio_max.item() == pytest.approx(10.0)
    expected_kl = sum(r - 1 - math.log(r) for r in [1.5, 0.5, 10.0, 1.1]) / 4
    assert output.metrics.approx_kl.item() == pytest.approx(expected_kl)


@pytest.mark.parametrize("low,high,dual", CLIP_SETTINGS)
def test_identical_policies_give_ratio_one_and_plain_policy_gradient(low, high, dual) -> None:
    for seed in range(5):
        _, mask, _, old_logprobs, advantages = _random_case(seed)
        logprobs = old_logprobs.clone().requires_grad_()
        output = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, low, high, dual)
        assert torch.equal(output.ratio[mask], torch.ones(int(mask.sum()), dtype=torch.float64))
        assert torch.equal(output.token_loss[mask], -advantages[mask])
        (ppo_gradient,) = torch.autograd.grad(output.loss, logprobs)
        plain = logprobs.detach().clone().requires_grad_()
        pg_loss = token_mean(-advantages.nan_to_num(0.0) * plain, mask)
        (pg_gradient,) = torch.autograd.grad(pg_loss, plain)
        torch.testing.assert_close(ppo_gradient, pg_gradient, **EXACT64)
        assert output.metrics.clip_fraction.item() == 0.0 and output.metrics.approx_kl.item() == 0.0


def test_padding_garbage_leaves_value_and_gradient_finite() -> None:
    _, mask, logprobs, old_logprobs, advantages = _random_case(3)
    logprobs = logprobs.masked_fill(~mask, float("-inf")).requires_grad_()
    output = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, dual_clip=2.0)
    output.loss.backward()
    assert torch.isfinite(output.token_loss).all() and torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[~mask] == 0).all() and (output.token_loss[~mask] == 0).all()


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_empty_mask_gives_zero_loss_and_neutral_metrics(reduction: str) -> None:
    nan = torch.full((2, 3), float("nan"), requires_grad=True)
    output = ppo_policy_loss(nan, nan, nan, torch.zeros(2, 3), reduction=reduction)
    output.loss.backward()
    assert output.loss.item() == 0.0 and torch.equal(nan.grad, torch.zeros(2, 3))
    metrics = output.metrics
    assert [metrics.clip_fraction.item(), metrics.approx_kl.item()] == [0.0, 0.0]
    assert [metrics.ratio_mean.item(), metrics.ratio_min.item(), metrics.ratio_max.item()] == [
        1.0,
        1.0,
        1.0,
    ]


def test_huge_log_ratio_stays_finite() -> None:
    output = ppo_policy_loss(
        torch.tensor([[500.0, -500.0]]),
        torch.zeros(1, 2),
        torch.tensor([[-1.0, 1.0]]),
        torch.ones(1, 2),
    )
    assert torch.isfinite(output.loss) and torch.isfinite(output.metrics.approx_kl)


def test_non_finite_advantage_at_response_token_raises_naming_it() -> None:
    advantages = torch.tensor([[0.0, float("nan")]])
    with pytest.raises(NonFiniteError, match=r"advantages .* index \(0, 1\)"):
        ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), advantages, torch.ones(1, 2))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"clip_low": 1.0}, "ppo_clip_low"),
        ({"clip_high": -0.1}, "ppo_clip_high"),
        ({"dual_clip": 1.0}, "dual clip constant must be > 1"),
    ],
)
def test_invalid_clip_settings_raise(kwargs, message) -> None:
    with pytest.raises(AlgorithmConfigError, match=message):
        ppo_policy_loss(
            torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), **kwargs
        )


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"advantages has shape \(1, 2\); expected \(1, 3\)"):
        ppo_policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 2), torch.ones(1, 3))
