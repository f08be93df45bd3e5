"""Property tests over seeded random edge batches, for every estimator and reduction.

Edge cases drawn at random: empty responses (zero-length masks, including all-empty batches),
groups of one sample (n = 1), groups whose rewards are all equal, NaN/-inf in padding, large
rewards. Properties: every output is finite; padding is exactly 0; advantages of constant and
single-sample groups are exactly 0 for the group estimators; identical old/new policies give
ratio exactly 1 and the plain policy-gradient loss.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    REDUCTIONS,
    AlgorithmConfig,
    Rollout,
    actor_loss,
    critic_loss,
    make_experience,
    masked_reduce,
)

from .batches import mask_from_lengths, random_tokens

TRIALS = 40


def _edge_rollout(generator: torch.Generator) -> Rollout:
    num_prompts = int(torch.randint(1, 5, (1,), generator=generator))
    group_size = int(torch.randint(1, 5, (1,), generator=generator))
    batch = num_prompts * group_size
    width = int(torch.randint(1, 7, (1,), generator=generator))
    empty_probability = float(torch.rand(1, generator=generator))
    lengths = [
        0
        if float(torch.rand(1, generator=generator)) < empty_probability
        else int(torch.randint(1, width + 1, (1,), generator=generator))
        for _ in range(batch)
    ]
    mask = mask_from_lengths(lengths, width)
    per_prompt = 10.0 * torch.randn(num_prompts, generator=generator)
    rewards = per_prompt.repeat_interleave(group_size)
    if float(torch.rand(1, generator=generator)) < 0.5:
        rewards = rewards + torch.randn(batch, generator=generator)
    group_index = torch.arange(num_prompts).repeat_interleave(group_size)
    permutation = torch.randperm(batch, generator=generator)
    old_logprobs = random_tokens(generator, mask, 0.5, torch.float32, float("-inf")) - 1.0
    return Rollout(
        rewards=rewards[permutation],
        response_mask=mask,
        old_logprobs=old_logprobs,
        ref_logprobs=old_logprobs + random_tokens(generator, mask, 0.2, torch.float32),
        values=random_tokens(generator, mask, 1.0, torch.float32),
        group_index=group_index[permutation],
        domain_ids=(group_index[permutation] % 2),
    )


def _configs(generator: torch.Generator):
    for estimator in ADVANTAGE_ESTIMATORS.names():
        critic_free = not ADVANTAGE_ESTIMATORS.get(estimator).needs_critic
        for normalization in ("none", "group", "batch", "domain"):
            yield AlgorithmConfig(
                advantage_estimator=estimator,
                reward_clip=(-5.0, 5.0),
                reward_normalization=normalization,
                reward_shrink_alpha=0.5 if critic_free else 1.0,
                kl_mode=("penalty", "loss", "none")[
                    int(torch.randint(0, 3, (1,), generator=generator))
                ],
                kl_estimator=("k1", "k2", "k3")[
                    int(torch.randint(0, 3, (1,), generator=generator))
                ],
                dual_clip=3.0,
                entropy_coef=0.01,
                loss_reduction=REDUCTIONS.names()[
                    int(torch.randint(0, 3, (1,), generator=generator))
                ],
            )


def test_all_outputs_finite_and_padding_zero_on_edge_batches() -> None:
    for trial in range(TRIALS):
        generator = torch.Generator().manual_seed(trial)
        rollout = _edge_rollout(generator)
        mask = rollout.response_mask
        for config in _configs(generator):
            experience, _ = make_experience(rollout, config, kl_coef=0.05)
            for name in ("advantages", "token_rewards", "returns", "kl"):
                tensor = getattr(experience, name)
                if tensor is not None:
                    assert torch.isfinite(tensor).all(), (trial, config, name)
                    assert (tensor[~mask] == 0).all(), (trial, config, name)
            logprobs = (
                rollout.old_logprobs + random_tokens(generator, mask, 0.3, torch.float32)
            ).requires_grad_()
            entropy = random_tokens(generator, mask, 1.0, torch.float32, float("nan")).abs()
            output = actor_loss(config, experience, logprobs, entropy=entropy, kl_coef=0.05)
            output.loss.backward()
            assert torch.isfinite(output.loss) and torch.isfinite(logprobs.grad).all(), (
                trial,
                config,
            )
            for metric in vars(output.metrics).values():
                assert torch.isfinite(metric), (trial, config)
            if config.needs_critic:
                values = rollout.values.clone().requires_grad_()
                value_output = critic_loss(config, experience, values)
                value_output.loss.backward()
                assert torch.isfinite(value_output.loss) and torch.isfinite(values.grad).all()


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_constant_and_single_sample_groups_get_exactly_zero_advantage(estimator: str) -> None:
    for trial in range(TRIALS):
        generator = torch.Generator().manual_seed(1000 + trial)
        rollout = _edge_rollout(generator)
        config = AlgorithmConfig(advantage_estimator=estimator, kl_mode="none")
        experience, _ = make_experience(rollout, config, kl_coef=0.0)
        for group in rollout.group_index.unique():
            members = rollout.group_index == group
            if (
                members.sum() == 1
                or (rollout.rewards[members] == rollout.rewards[members][0]).all()
            ):
                assert (experience.advantages[members] == 0).all(), (trial, int(group))


def test_identical_policies_give_ratio_one_and_plain_policy_gradient_loss() -> None:
    for trial in range(TRIALS):
        generator = torch.Generator().manual_seed(2000 + trial)
        rollout = _edge_rollout(generator)
        for config in _configs(generator):
            experience, _ = make_experience(rollout, config, kl_coef=0.0)
            plain = AlgorithmConfig(**{**vars(config), "kl_mode": "none", "entropy_coef": 0.0})
            output = actor_loss(plain, experience, rollout.old_logprobs.clone())
            mask = experience.response_mask
            assert output.metrics.ratio_min.item() == 1.0 and output.metrics.ratio_max.item() == 1.0
            expected = masked_reduce(-experience.advantages, mask, config.loss_reduction)
            assert output.policy_loss.item() == expected.item(), (trial, config)
