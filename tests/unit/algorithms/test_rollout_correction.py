"""Truncated importance sampling (token and sequence level) against a plain-Python computation."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlhf.algorithms import (
    AlgorithmConfig,
    AlgorithmConfigError,
    Experience,
    actor_loss,
    ppo_policy_loss,
    rollout_correction_stats,
    truncated_is_weights,
)

from . import references
from .batches import mask_from_lengths, random_lengths, random_tokens, to_rows

EXACT64 = {"rtol": 1e-12, "atol": 1e-14}
WIDTH = 9


def _case(seed: int, spread: float = 0.4):
    generator = torch.Generator().manual_seed(seed)
    lengths = random_lengths(generator, 6, WIDTH)
    mask = mask_from_lengths(lengths, WIDTH)
    rollout = random_tokens(generator, mask, scale=0.5) - 1.5
    old = rollout + random_tokens(generator, mask, scale=spread)
    return lengths, mask, old, rollout


def _reference_weights(old_rows, rollout_rows, level: str, threshold: float) -> list[list[float]]:
    """Weights per response token, one token (or one response) at a time, in double precision."""
    rows = []
    for old, rollout in zip(old_rows, rollout_rows):
        ratios = [math.exp(a - b) for a, b in zip(old, rollout)]
        if level == "token":
            rows.append([min(r, threshold) for r in ratios])
        else:
            product = math.prod(ratios)
            rows.append([min(product, threshold)] * len(ratios))
    return rows


def _padded(rows: list[list[float]], pad: float) -> torch.Tensor:
    return torch.tensor([row + [pad] * (WIDTH - len(row)) for row in rows], dtype=torch.float64)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [0.8, 1.0, 1.5, 2.0, 10.0])
def test_weights_match_an_independent_computation(level: str, threshold: float) -> None:
    truncated = 0
    for seed in range(8):
        lengths, mask, old, rollout = _case(seed)
        old_rows, rollout_rows = to_rows(old, lengths), to_rows(rollout, lengths)
        expected_rows = _reference_weights(old_rows, rollout_rows, level, threshold)
        weights = truncated_is_weights(old, rollout, mask, level, threshold)
        torch.testing.assert_close(weights, _padded(expected_rows, 1.0), **EXACT64)
        assert not weights.requires_grad
        truncated += sum(w == threshold for row in expected_rows for w in row)
        stats = rollout_correction_stats(old, rollout, mask, level, threshold)
        tokens = [w for row in expected_rows for w in row]
        assert stats.weight_mean.item() == pytest.approx(sum(tokens) / len(tokens), rel=1e-12)
        assert stats.weight_max.item() == pytest.approx(max(tokens), rel=1e-12)
        assert stats.weight_min.item() == pytest.approx(min(tokens), rel=1e-12)
        ratios = [math.exp(a - b) for o, r in zip(old_rows, rollout_rows) for a, b in zip(o, r)]
        kl = sum(r - 1 - math.log(r) for r in ratios) / len(ratios)
        assert stats.mismatch_kl.item() == pytest.approx(kl, rel=1e-10)
        if level == "token":
            over = sum(r > threshold for r in ratios) / len(ratios)
        else:
            over = sum(len(o) * (math.prod(math.exp(a - b) for a, b in zip(o, r)) > threshold)
                       for o, r in zip(old_rows, rollout_rows)) / len(ratios)
        assert stats.truncated_fraction.item() == pytest.approx(over, abs=1e-12)
    if threshold <= 1.0:
        assert truncated > 0  # the truncation was really exercised


def test_hand_computed_weights() -> None:
    rollout = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.4, 0.4, 0.4]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.5, 0.75, 0.05], [0.2, 0.8, 0.0]], dtype=torch.float64).clamp(min=1e-300))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    token = truncated_is_weights(old, rollout, mask, "token", 2.0)
    torch.testing.assert_close(token, torch.tensor([[1.0, 2.0, 0.5], [0.5, 2.0, 1.0]], dtype=torch.float64))
    sequence = truncated_is_weights(old, rollout, mask, "sequence", 2.0)  # products 1.5 and 1.0
    torch.testing.assert_close(sequence, torch.tensor([[1.5, 1.5, 1.5], [1.0, 1.0, 1.0]], dtype=torch.float64))
    capped = truncated_is_weights(old, rollout, mask, "sequence", 1.2)
    torch.testing.assert_close(capped, torch.tensor([[1.2, 1.2, 1.2], [1.0, 1.0, 1.0]], dtype=torch.float64))


def test_long_responses_never_overflow_and_none_is_all_ones() -> None:
    mask = torch.ones(2, 4000)
    old, rollout = torch.zeros(2, 4000), torch.full((2, 4000), -1.0)  # product e^4000
    weights = truncated_is_weights(old, rollout, mask, "sequence", 3.0)
    assert torch.isfinite(weights).all() and torch.allclose(weights, torch.full_like(weights, 3.0))
    assert torch.equal(truncated_is_weights(old, rollout, mask, "none", 3.0), torch.ones(2, 4000))


def test_identical_policies_give_unit_weights_and_zero_mismatch() -> None:
    _, mask, old, _ = _case(1)
    for level in ("token", "sequence"):
        weights = truncated_is_weights(old, old.clone(), mask, level, 2.0)
        assert torch.equal(weights, torch.ones_like(weights))
        stats = rollout_correction_stats(old, old.clone(), mask, level, 2.0)
        assert stats.mismatch_kl.item() == 0.0 and stats.truncated_fraction.item() == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss_is_weighted_per_token(level: str) -> None:
    lengths, mask, old, rollout = _case(4)
    generator = torch.Generator().manual_seed(9)
    logprobs = (old + random_tokens(generator, mask, scale=0.3)).requires_grad_()
    advantages = random_tokens(generator, mask)
    weights = truncated_is_weights(old, rollout, mask, level, 1.5)
    output = ppo_policy_loss(logprobs, old, advantages, mask, 0.2, 0.28, 3.0, is_weights=weights)
    weight_rows = to_rows(weights, lengths)
    rows = [
        [w * references.ppo_token_loss(a, b, c, 0.2, 0.28, 3.0) for w, a, b, c in zip(wr, lp, ol, ad)]
        for wr, lp, ol, ad in zip(weight_rows, to_rows(logprobs.detach(), lengths), to_rows(old, lengths),
                                  to_rows(advantages, lengths))
    ]
    torch.testing.assert_close(output.token_loss.detach(), _padded(rows, 0.0), **EXACT64)
    assert output.loss.item() == pytest.approx(references.reduce(rows, "token_mean"), rel=1e-12)


def test_actor_loss_applies_the_configured_correction() -> None:
    _, mask, old, rollout = _case(6)
    generator = torch.Generator().manual_seed(2)
    advantages = random_tokens(generator, mask)
    logprobs = old + random_tokens(generator, mask, scale=0.2)
    experience = Experience(response_mask=mask, old_logprobs=old, advantages=advantages,
                            token_rewards=torch.zeros_like(old), sequence_scores=torch.zeros(6),
                            raw_rewards=torch.zeros(6), rollout_logprobs=rollout)
    plain = actor_loss(AlgorithmConfig(kl_mode="none"), experience, logprobs)
    corrected = actor_loss(AlgorithmConfig(kl_mode="none", rollout_is="token", rollout_is_threshold=2.0),
                           experience, logprobs)
    weights = truncated_is_weights(old, rollout, mask, "token", 2.0)
    expected = ppo_policy_loss(logprobs, old, advantages, mask, is_weights=weights)
    assert corrected.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    assert corrected.loss.item() != pytest.approx(plain.loss.item(), rel=1e-6)


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(AlgorithmConfigError, match="rollout_is="):
        AlgorithmConfig(rollout_is="tokens")
    with pytest.raises(AlgorithmConfigError, match="rollout_is_threshold"):
        AlgorithmConfig(rollout_is="token", rollout_is_threshold=0.0)


def test_mismatch_kl_is_never_negative_when_the_policies_nearly_agree() -> None:
    """k3 = r - 1 - log r >= 0: computed as exp(x) - 1 - x in fp32 it rounded to -1e-9 at
    |x| ~ 1e-7 (a resumed engine holding the trainer's exact weights), failing the >= 0 promise."""
    generator = torch.Generator().manual_seed(3)
    old = -torch.rand(64, 16, generator=generator) * 5
    for scale in (1e-8, 1e-7, 1e-6, 3e-6):
        rollout = old + scale * torch.randn(64, 16, generator=generator)
        mask = torch.ones(64, 16, dtype=torch.bool)
        stats = rollout_correction_stats(old, rollout, mask, "token", 2.0)
        assert stats.mismatch_kl.item() >= 0.0, scale
        assert stats.mismatch_kl.item() <= 10 * scale**2 + 1e-12, scale
