"""Rollout -> Experience: reward shaping, KL penalty and advantage estimation, in the paper's order.

:func:`make_experience` is a pure function of a :class:`~.experience.Rollout`, an
:class:`~.config.AlgorithmConfig`, the current KL coefficient and the running per-domain reward
statistics. Stages, in order ("Does RLHF Scale?", Hou et al. 2024, Sec. 3 and 3.2):

1. clip the raw sequence rewards to ``config.reward_clip``;
2. normalise them (``config.reward_normalization``: none / group / batch / domain);
3. the estimator's sequence baseline (GRPO / RLOO / group mean; identity for GAE, REINFORCE++);
4. asymmetric reward shrinking, critic-free estimators only (``config.reward_shrink_alpha``);
5. token rewards: the score at each response's last token, plus ``-kl_coef * kl_t`` when
   ``config.kl_mode == "penalty"`` (KL of the rollout policy against the reference);
6. the estimator's token stage (GAE, returns-to-go, or batch-whitened returns-to-go).

Everything runs under ``torch.no_grad()``: the outputs are targets, not part of the graph.

Validation (host syncs, once per step): shapes of every tensor, the mask (0/1, right-padded),
presence of what the config needs (values for "gae", group ids for group estimators and group
normalisation, domain ids for domain normalisation, reference log-probs unless ``kl_mode ==
"none"``), finiteness of rewards / log-probs / values at response tokens (NonFiniteError naming
the tensor). Padding positions may hold anything.
"""

from __future__ import annotations

import torch

from megatron_rlhf.algorithms.advantages import AdvantageParams, advantage_estimator
from megatron_rlhf.algorithms.config import AlgorithmConfig
from megatron_rlhf.algorithms.domain_normalization import DomainRewardStats
from megatron_rlhf.algorithms.errors import BatchShapeError
from megatron_rlhf.algorithms.experience import Experience, Rollout
from megatron_rlhf.algorithms.finite import check_all_finite
from megatron_rlhf.algorithms.groups import check_group_index
from megatron_rlhf.algorithms.kl import kl_estimate, kl_penalty_rewards
from megatron_rlhf.algorithms.masks import (
    as_bool_mask,
    check_response_mask,
    check_token_shapes,
    place_at_last_token,
)
from megatron_rlhf.algorithms.reward_shaping import (
    NormalizationInputs,
    asymmetric_shrink,
    clip_rewards,
    normalize_rewards,
)


def make_experience(
    rollout: Rollout,
    config: AlgorithmConfig,
    *,
    kl_coef: float,
    domain_stats: DomainRewardStats | None = None,
) -> tuple[Experience, DomainRewardStats | None]:
    """Shape rewards, apply the KL penalty and estimate advantages as ``config`` says.

    Args:
        rollout: the sampled batch (see :class:`~.experience.Rollout` for shapes).
        config: algorithm settings.
        kl_coef: current KL coefficient (``controller.value``); >= 0. Unused unless
            ``config.kl_mode == "penalty"``.
        domain_stats: running per-domain reward moments ("domain" normalisation); None = empty.

    Returns:
        The :class:`~.experience.Experience` and the domain statistics to keep for the next step
        (updated for "domain" normalisation, otherwise ``domain_stats`` unchanged).
    """
    _validate(rollout, config)
    mask = as_bool_mask(rollout.response_mask)
    estimator = advantage_estimator(config.advantage_estimator)
    params = AdvantageParams(
        gamma=config.gamma,
        lam=config.gae_lambda,
        eps=config.advantage_eps,
        normalize_std=config.grpo_normalize_std,
    )
    with torch.no_grad():
        scores = rollout.rewards
        if config.reward_clip is not None:
            scores = clip_rewards(scores, *config.reward_clip)
        normalization_inputs = NormalizationInputs(
            rollout.group_index, rollout.domain_ids, domain_stats, config.reward_norm_eps
        )
        scores, new_domain_stats = normalize_rewards(
            scores, config.reward_normalization, normalization_inputs
        )
        scores = estimator.sequence_baseline(scores, rollout.group_index, params)
        if config.reward_shrink_alpha < 1.0:
            scores = asymmetric_shrink(scores, config.reward_shrink_alpha)
        kl = None
        if config.kl_mode != "none":
            assert rollout.ref_logprobs is not None
            kl = kl_estimate(rollout.old_logprobs, rollout.ref_logprobs, mask, config.kl_estimator)
        token_rewards = place_at_last_token(scores, mask)
        if config.kl_mode == "penalty":
            assert kl is not None
            token_rewards = token_rewards + kl_penalty_rewards(kl, mask, kl_coef)
        result = estimator.token_advantages(token_rewards, mask, rollout.values, params)
    experience = Experience(
        response_mask=mask,
        old_logprobs=rollout.old_logprobs,
        advantages=result.advantages,
        token_rewards=token_rewards,
        sequence_scores=scores,
        raw_rewards=rollout.rewards,
        ref_logprobs=rollout.ref_logprobs,
        kl=kl,
        returns=result.returns,
        old_values=rollout.values if estimator.needs_critic else None,
        group_index=rollout.group_index,
        rollout_logprobs=rollout.rollout_logprobs,
    )
    return experience, new_domain_stats if new_domain_stats is not None else domain_stats


def _validate(rollout: Rollout, config: AlgorithmConfig) -> None:
    check_response_mask(rollout.response_mask)
    mask = as_bool_mask(rollout.response_mask)
    batch_size = mask.shape[0]
    if tuple(rollout.rewards.shape) != (batch_size,):
        raise BatchShapeError(
            f"Rollout.rewards has shape {tuple(rollout.rewards.shape)}; expected [{batch_size}] "
            "(one reward per response_mask row)"
        )
    check_token_shapes(
        mask,
        old_logprobs=rollout.old_logprobs,
        ref_logprobs=rollout.ref_logprobs,
        values=rollout.values,
        rollout_logprobs=rollout.rollout_logprobs,
    )
    for name, ids in (("group_index", rollout.group_index), ("domain_ids", rollout.domain_ids)):
        if ids is not None:
            check_group_index(ids, batch_size, f"Rollout.{name}")
    for name, needed in _required_fields(config).items():
        if needed and getattr(rollout, name) is None:
            raise BatchShapeError(f"Rollout.{name} is None but {needed}")
    check_all_finite(
        {
            "old_logprobs": rollout.old_logprobs,
            "ref_logprobs": rollout.ref_logprobs if config.kl_mode != "none" else None,
            "values": rollout.values if config.needs_critic else None,
            "rollout_logprobs": rollout.rollout_logprobs if config.rollout_is != "none" else None,
        },
        mask,
    )


def _required_fields(config: AlgorithmConfig) -> dict[str, str]:
    """Rollout field -> why this config needs it ('' when it does not)."""
    estimator = advantage_estimator(config.advantage_estimator)
    name = f"advantage_estimator={config.advantage_estimator!r}"
    return {
        "values": f"{name} needs critic values" if estimator.needs_critic else "",
        "group_index": (
            f"{name} needs prompt groups"
            if estimator.needs_groups
            else "reward_normalization='group' needs prompt groups"
            if config.reward_normalization == "group"
            else ""
        ),
        "domain_ids": (
            "reward_normalization='domain' needs domain ids"
            if config.reward_normalization == "domain"
            else ""
        ),
        "ref_logprobs": (
            f"kl_mode={config.kl_mode!r} needs reference log-probs"
            if config.kl_mode != "none"
            else ""
        ),
        "rollout_logprobs": (
            f"rollout_is={config.rollout_is!r} needs the engine's sampling log-probs"
            if config.rollout_is != "none"
            else ""
        ),
    }
