"""actor_loss / critic_loss assemble the configured terms with the configured reduction."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.algorithms import (
    AlgorithmConfig,
    Rollout,
    actor_loss,
    clipped_value_loss,
    critic_loss,
    entropy_bonus_loss,
    kl_loss,
    make_experience,
    ppo_policy_loss,
)

from .batches import mask_from_lengths, random_tokens


def _experience(config: AlgorithmConfig, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mask = mask_from_lengths([4, 2, 3, 0], 4)
    old_logprobs = random_tokens(generator, mask, scale=0.3) - 1.0
    rollout = Rollout(
        rewards=torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64),
        response_mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=old_logprobs + random_tokens(generator, mask, scale=0.1),
        values=random_tokens(generator, mask),
        group_index=torch.tensor([0, 0, 1, 1]),
    )
    experience, _ = make_experience(rollout, config, kl_coef=config.kl_coef)
    logprobs = (old_logprobs + random_tokens(generator, mask, scale=0.2)).requires_grad_()
    return experience, logprobs, random_tokens(generator, mask).abs()


def test_actor_loss_is_sum_of_terms() -> None:
    config = AlgorithmConfig(
        advantage_estimator="grpo",
        kl_mode="loss",
        kl_estimator="k3",
        entropy_coef=0.01,
        loss_reduction="seq_mean_token_mean",
        dual_clip=3.0,
        ppo_clip_high=0.28,
    )
    experience, logprobs, entropy = _experience(config)
    output = actor_loss(config, experience, logprobs, entropy=entropy, kl_coef=0.3)
    mask = experience.response_mask
    policy = ppo_policy_loss(
        logprobs,
        experience.old_logprobs,
        experience.advantages,
        mask,
        0.2,
        0.28,
        3.0,
        "seq_mean_token_mean",
    )
    kl = kl_loss(logprobs, experience.ref_logprobs, mask, "k3", "seq_mean_token_mean")
    entropy_term = entropy_bonus_loss(entropy, mask, 0.01, "seq_mean_token_mean")
    torch.testing.assert_close(output.loss, policy.loss + 0.3 * kl + entropy_term)
    torch.testing.assert_close(output.kl_loss, kl)
    output.loss.backward()
    assert torch.isfinite(logprobs.grad).all() and (logprobs.grad[~mask] == 0).all()


def test_penalty_mode_adds_no_kl_loss() -> None:
    config = AlgorithmConfig(kl_mode="penalty")
    experience, logprobs, _ = _experience(config)
    output = actor_loss(config, experience, logprobs, kl_coef=0.3)
    assert output.kl_loss.item() == 0.0 and output.entropy_loss.item() == 0.0
    torch.testing.assert_close(output.loss, output.policy_loss)


def test_missing_entropy_is_named() -> None:
    config = AlgorithmConfig(entropy_coef=0.01)
    experience, logprobs, _ = _experience(config)
    with pytest.raises(ValueError, match="entropy_coef=0.01 needs the policy entropy"):
        actor_loss(config, experience, logprobs)


def test_critic_loss_uses_returns_and_old_values() -> None:
    config = AlgorithmConfig(value_clip=0.1)
    experience, _, _ = _experience(config)
    values = (experience.old_values.nan_to_num(0.0) + 0.3).requires_grad_()
    output = critic_loss(config, experience, values)
    expected = clipped_value_loss(
        values, experience.old_values, experience.returns, experience.response_mask, 0.1
    )
    torch.testing.assert_close(output.loss, expected.loss)


def test_critic_loss_without_critic_experience_is_named() -> None:
    config = AlgorithmConfig(advantage_estimator="rloo")
    experience, logprobs, _ = _experience(config)
    with pytest.raises(ValueError, match="critic_loss needs Experience.returns and old_values"):
        critic_loss(config, experience, logprobs)
