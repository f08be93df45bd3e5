"""KL estimators, KL penalty and KL loss against scalar references and the exact KL."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlhf.algorithms import (
    KL_ESTIMATORS,
    NonFiniteError,
    UnknownNameError,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss,
    kl_penalty_rewards,
)

from . import references
from .batches import mask_from_lengths, random_lengths, random_tokens

EXACT64 = {"rtol": 1e-12, "atol": 1e-14}


def test_registry_keys() -> None:
    assert KL_ESTIMATORS.names() == ("k1", "k2", "k3")
    with pytest.raises(UnknownNameError, match="k1, k2, k3"):
        KL_ESTIMATORS.get("k4")


@pytest.mark.parametrize("name,function", [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)])
def test_estimators_match_scalar_formulas(name: str, function) -> None:
    generator = torch.Generator().manual_seed(11)
    logprobs = -3.0 * torch.rand(64, generator=generator, dtype=torch.float64)
    ref_logprobs = -3.0 * torch.rand(64, generator=generator, dtype=torch.float64)
    expected = [references.kl(name, a, b) for a, b in zip(logprobs.tolist(), ref_logprobs.tolist())]
    torch.testing.assert_close(
        function(logprobs, ref_logprobs), torch.tensor(expected, dtype=torch.float64), **EXACT64
    )


def test_hand_computed_values_at_log_ratio_log2() -> None:
    logprobs, ref_logprobs = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k1(logprobs, ref_logprobs).item() == pytest.approx(math.log(2), rel=1e-6)
    assert kl_k2(logprobs, ref_logprobs).item() == pytest.approx(0.5 * math.log(2) ** 2, rel=1e-6)
    assert kl_k3(logprobs, ref_logprobs).item() == pytest.approx(0.5 - 1 + math.log(2), rel=1e-6)


def test_direction_is_kl_of_policy_to_reference_sampled_from_policy() -> None:
    # Sample tokens from pi; k1 and k3 are unbiased for KL(pi || pi_ref), not KL(pi_ref || pi).
    pi = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    pi_ref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    forward_kl = (pi * (pi / pi_ref).log()).sum().item()
    reverse_kl = (pi_ref * (pi_ref / pi).log()).sum().item()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=generator)
    logprobs, ref_logprobs = pi.log()[tokens], pi_ref.log()[tokens]
    for function in (kl_k1, kl_k3):
        samples = function(logprobs, ref_logprobs)
        standard_error = samples.std().item() / math.sqrt(samples.numel())
        assert abs(samples.mean().item() - forward_kl) < 5 * standard_error
        assert abs(samples.mean().item() - reverse_kl) > 20 * standard_error


def test_k2_and_k3_are_non_negative_and_zero_at_equal_policies() -> None:
    generator = torch.Generator().manual_seed(1)
    logprobs = torch.randn(1000, generator=generator)
    ref_logprobs = torch.randn(1000, generator=generator)
    assert (kl_k2(logprobs, ref_logprobs) >= 0).all() and (kl_k3(logprobs, ref_logprobs) >= 0).all()
    for function in (kl_k1, kl_k2, kl_k3):
        assert torch.equal(function(logprobs, logprobs), torch.zeros(1000))


def test_k3_stays_finite_for_extreme_log_ratios() -> None:
    logprobs = torch.tensor([-200.0, 0.0])
    ref_logprobs = torch.tensor([0.0, -200.0])
    assert torch.isfinite(kl_k3(logprobs, ref_logprobs)).all()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate_zero_at_padding_and_ignores_padding_garbage(estimator: str) -> None:
    generator = torch.Generator().manual_seed(2)
    lengths = random_lengths(generator, 4, 6)
    mask = mask_from_lengths(lengths, 6)
    logprobs = random_tokens(generator, mask, pad_value=float("-inf"))
    ref_logprobs = random_tokens(generator, mask)
    kl = kl_estimate(logprobs, ref_logprobs, mask, estimator)
    assert torch.isfinite(kl).all() and (kl[~mask] == 0).all()
    expected = KL_ESTIMATORS.get(estimator)(logprobs[mask], ref_logprobs[mask])
    torch.testing.assert_close(kl[mask], expected, **EXACT64)


def test_penalty_is_minus_coef_times_kl() -> None:
    kl = torch.tensor([[0.5, -0.25, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    assert kl_penalty_rewards(kl, mask, 0.1).tolist() == [[-0.05, 0.025, 0.0]]
    with pytest.raises(ValueError, match="KL coefficient must be >= 0; got -1"):
        kl_penalty_rewards(kl, mask, -1.0)


def test_kl_loss_is_reduced_estimate_and_differentiable() -> None:
    generator = torch.Generator().manual_seed(5)
    mask = mask_from_lengths([3, 1], 3)
    logprobs = random_tokens(generator, mask, pad_value=0.0).requires_grad_()
    ref_logprobs = random_tokens(generator, mask, pad_value=0.0)
    loss = kl_loss(logprobs, ref_logprobs, mask, "k3", "seq_mean_token_mean")
    rows = [
        [references.kl("k3", a, b) for a, b in zip(lp[:n], rl[:n])]
        for lp, rl, n in zip(logprobs.tolist(), ref_logprobs.tolist(), [3, 1])
    ]
    assert loss.item() == pytest.approx(references.reduce(rows, "seq_mean_token_mean"), rel=1e-12)
    loss.backward()
    assert (logprobs.grad[~mask] == 0).all() and (logprobs.grad[mask] != 0).all()


def test_non_finite_log_prob_at_response_token_raises() -> None:
    logprobs = torch.tensor([[0.0, float("nan")]])
    with pytest.raises(NonFiniteError, match="logprobs"):
        kl_estimate(logprobs, torch.zeros(1, 2), torch.ones(1, 2), "k1")
