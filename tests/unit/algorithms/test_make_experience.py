"""make_experience: the paper's order (clip -> normalise -> baseline -> shrink), KL, estimators."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.algorithms import (
    AlgorithmConfig,
    DomainRewardStats,
    Rollout,
    gae_advantages,
    kl_estimate,
    make_experience,
)

from . import references
from .batches import mask_from_lengths, random_lengths, random_tokens

EXACT64 = {"rtol": 1e-10, "atol": 1e-12}


def _rollout(
    seed: int, rewards: list[float], lengths: list[int], width: int = 5, **extra
) -> Rollout:
    generator = torch.Generator().manual_seed(seed)
    mask = mask_from_lengths(lengths, width)
    old_logprobs = random_tokens(generator, mask, scale=0.3) - 1.0
    return Rollout(
        rewards=torch.tensor(rewards, dtype=torch.float64),
        response_mask=mask.long(),
        old_logprobs=old_logprobs,
        ref_logprobs=old_logprobs + random_tokens(generator, mask, scale=0.1),
        values=random_tokens(generator, mask),
        **extra,
    )


def test_grpo_order_clip_then_group_advantage_then_shrink() -> None:
    # raw [10, 0, -10, 2] -> clip(-3, 3) -> [3, 0, -3, 2]; groups {0,1}, {2,3}:
    # GRPO (unbiased std): +-1.5 / sqrt(4.5) = +-0.7071, +-2.5 / sqrt(12.5) = +-0.7071;
    # shrink 0.5 halves the negatives.
    rollout = _rollout(
        0, [10.0, 0.0, -10.0, 2.0], [3, 2, 4, 1], group_index=torch.tensor([0, 0, 1, 1])
    )
    config = AlgorithmConfig(
        advantage_estimator="grpo",
        reward_clip=(-3.0, 3.0),
        reward_shrink_alpha=0.5,
        kl_mode="none",
        advantage_eps=1e-12,
    )
    experience, _ = make_experience(rollout, config, kl_coef=0.0)
    root_half = 0.5**0.5
    expected = torch.tensor(
        [root_half, -0.5 * root_half, -0.5 * root_half, root_half], dtype=torch.float64
    )
    torch.testing.assert_close(experience.sequence_scores, expected, **EXACT64)
    broadcast = expected[:, None].expand(4, 5).masked_fill(~experience.response_mask, 0.0)
    torch.testing.assert_close(experience.advantages, broadcast, **EXACT64)
    assert experience.returns is None and experience.old_values is None


def test_gae_with_kl_penalty_matches_reference_composition() -> None:
    for seed in range(10):
        generator = torch.Generator().manual_seed(100 + seed)
        lengths = random_lengths(generator, 4, 6)
        rewards = torch.randn(4, generator=generator, dtype=torch.float64).tolist()
        rollout = _rollout(seed, rewards, lengths, width=6)
        config = AlgorithmConfig(kl_estimator="k1", kl_coef=0.1, gamma=0.99, gae_lambda=0.9)
        experience, _ = make_experience(rollout, config, kl_coef=0.1)
        for row, length in enumerate(lengths):
            old = rollout.old_logprobs[row, :length].tolist()
            ref = rollout.ref_logprobs[row, :length].tolist()
            token_rewards = [-0.1 * references.kl("k1", a, b) for a, b in zip(old, ref)]
            if length:
                token_rewards[-1] += rewards[row]
            advantages, returns = references.gae(
                token_rewards, rollout.values[row, :length].tolist(), 0.99, 0.9
            )
            torch.testing.assert_close(
                experience.advantages[row, :length],
                torch.tensor(advantages, dtype=torch.float64),
                **EXACT64,
            )
            torch.testing.assert_close(
                experience.returns[row, :length],
                torch.tensor(returns, dtype=torch.float64),
                **EXACT64,
            )
            assert (experience.advantages[row, length:] == 0).all()


def test_kl_loss_mode_keeps_penalty_out_of_rewards() -> None:
    rollout = _rollout(1, [1.0, -1.0], [3, 2], group_index=torch.tensor([0, 0]))
    config = AlgorithmConfig(advantage_estimator="rloo", kl_mode="loss", kl_estimator="k3")
    experience, _ = make_experience(rollout, config, kl_coef=0.5)
    assert experience.advantages[0, :3].tolist() == [2.0, 2.0, 2.0]
    expected_kl = kl_estimate(
        rollout.old_logprobs, rollout.ref_logprobs, rollout.response_mask, "k3"
    )
    torch.testing.assert_close(experience.kl, expected_kl)


def test_group_normalisation_then_critic() -> None:
    rollout = _rollout(
        2, [1.0, 3.0, 5.0, 5.0], [2, 2, 2, 2], group_index=torch.tensor([0, 0, 1, 1])
    )
    config = AlgorithmConfig(reward_normalization="group", kl_mode="none", reward_norm_eps=1e-12)
    experience, _ = make_experience(rollout, config, kl_coef=0.0)
    torch.testing.assert_close(
        experience.sequence_scores,
        torch.tensor([-(0.5**0.5), 0.5**0.5, 0.0, 0.0], dtype=torch.float64),
        **EXACT64,
    )
    expected, _ = gae_advantages(
        experience.token_rewards, rollout.values, rollout.response_mask, 1.0, 0.95
    )
    torch.testing.assert_close(experience.advantages, expected)


def test_domain_normalisation_threads_stats() -> None:
    rollout = _rollout(3, [1.0, 2.0, 3.0], [1, 1, 1], domain_ids=torch.tensor([0, 0, 1]))
    config = AlgorithmConfig(
        advantage_estimator="reinforce_pp", reward_normalization="domain", kl_mode="none"
    )
    _, stats = make_experience(rollout, config, kl_coef=0.0)
    _, stats = make_experience(rollout, config, kl_coef=0.0, domain_stats=stats)
    assert (
        isinstance(stats, DomainRewardStats)
        and stats.moments[0].count == 4
        and stats.moments[1].count == 2
    )


@pytest.mark.parametrize(
    "config,missing",
    [
        (
            AlgorithmConfig(advantage_estimator="grpo"),
            "Rollout.group_index is None but advantage_estimator='grpo' needs prompt groups",
        ),
        (AlgorithmConfig(reward_normalization="domain"), "Rollout.domain_ids is None"),
        (
            AlgorithmConfig(reward_normalization="group"),
            "reward_normalization='group' needs prompt groups",
        ),
    ],
)
def test_missing_inputs_are_named(config: AlgorithmConfig, missing: str) -> None:
    with pytest.raises(ValueError, match=missing):
        make_experience(_rollout(4, [1.0, 2.0], [2, 2]), config, kl_coef=0.0)


def test_missing_values_and_reference_are_named() -> None:
    rollout = _rollout(5, [1.0], [2])
    no_values = Rollout(
        rollout.rewards, rollout.response_mask, rollout.old_logprobs, rollout.ref_logprobs
    )
    with pytest.raises(
        ValueError, match="Rollout.values is None but advantage_estimator='gae' needs critic values"
    ):
        make_experience(no_values, AlgorithmConfig(), kl_coef=0.0)
    no_ref = Rollout(
        rollout.rewards, rollout.response_mask, rollout.old_logprobs, values=rollout.values
    )
    with pytest.raises(ValueError, match="Rollout.ref_logprobs is None but kl_mode='penalty'"):
        make_experience(no_ref, AlgorithmConfig(), kl_coef=0.0)


def test_left_padded_mask_is_rejected() -> None:
    rollout = _rollout(6, [1.0], [2])
    bad = Rollout(
        rollout.rewards,
        torch.tensor([[0, 1, 1, 0, 0]]),
        rollout.old_logprobs,
        rollout.ref_logprobs,
        rollout.values,
    )
    with pytest.raises(ValueError, match="right-padded; row 0 has a 0 at position 0"):
        make_experience(bad, AlgorithmConfig(), kl_coef=0.0)


def test_wrong_reward_shape_is_named() -> None:
    rollout = _rollout(7, [1.0, 2.0], [2, 2])
    bad = Rollout(
        torch.zeros(3),
        rollout.response_mask,
        rollout.old_logprobs,
        rollout.ref_logprobs,
        rollout.values,
    )
    with pytest.raises(ValueError, match=r"Rollout.rewards has shape \(3,\); expected \[2\]"):
        make_experience(bad, AlgorithmConfig(), kl_coef=0.0)


def test_experience_select_slices_every_tensor() -> None:
    rollout = _rollout(8, [1.0, 2.0, 3.0], [2, 3, 1], group_index=torch.tensor([0, 0, 0]))
    experience, _ = make_experience(
        rollout, AlgorithmConfig(advantage_estimator="grpo"), kl_coef=0.1
    )
    part = experience.select(slice(1, 3))
    assert part.batch_size == 2 and torch.equal(part.advantages, experience.advantages[1:3])
    assert torch.equal(part.group_index, experience.group_index[1:3]) and part.returns is None
