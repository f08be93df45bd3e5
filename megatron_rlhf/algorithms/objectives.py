"""The actor and critic losses of one micro-batch, assembled from an AlgorithmConfig.

    actor loss  = PPO clipped surrogate (:mod:`.policy_loss`), each token's term times its
                  truncated importance weight when rollout_is != "none" (:mod:`.rollout_correction`)
                + kl_coef * KL loss        (only if kl_mode == "loss"; :mod:`.kl`)
                - entropy_coef * entropy   (only if entropy_coef > 0; :mod:`.entropy`)
    critic loss = clipped value loss       (:mod:`.value_loss`)

each term reduced with ``config.loss_reduction`` over the micro-batch. Under micro-batching or
data parallelism the trainer decides how micro-batch losses combine; for an exact global
``token_mean`` over unequal micro-batches use the numerator/denominator of
:func:`~megatron_rlhf.algorithms.reductions.reduction_parts` instead of averaging these values.

Model outputs (``logprobs``, ``entropy``, ``values``) are ``[B, T]`` over the response tokens of
``experience`` (same B, T, mask). Non-finite handling as in the term modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from megatron_rlhf.algorithms.config import AlgorithmConfig
from megatron_rlhf.algorithms.entropy import entropy_bonus_loss
from megatron_rlhf.algorithms.errors import BatchShapeError
from megatron_rlhf.algorithms.experience import Experience
from megatron_rlhf.algorithms.kl import kl_loss
from megatron_rlhf.algorithms.policy_loss import PolicyLossMetrics, ppo_policy_loss
from megatron_rlhf.algorithms.rollout_correction import truncated_is_weights
from megatron_rlhf.algorithms.value_loss import ValueLossOutput, clipped_value_loss


@dataclass(frozen=True)
class ActorLossOutput:
    """The total actor loss and its terms, all ``[]``."""

    loss: Tensor
    """policy_loss + kl_coef * kl_loss + entropy_loss; differentiable."""
    policy_loss: Tensor
    """Reduced PPO clipped surrogate."""
    kl_loss: Tensor
    """Reduced KL estimate, *before* multiplying by the coefficient (0 unless kl_mode == "loss")."""
    entropy_loss: Tensor
    """``-entropy_coef * reduced entropy`` (0 when entropy_coef == 0)."""
    metrics: PolicyLossMetrics
    """Clip fractions, approximate KL to pi_old, ratio statistics."""


def actor_loss(
    config: AlgorithmConfig,
    experience: Experience,
    logprobs: Tensor,
    *,
    entropy: Tensor | None = None,
    kl_coef: float = 0.0,
    check_finite_inputs: bool = True,
) -> ActorLossOutput:
    """Actor loss of ``experience`` given the current policy's ``[B, T]`` log-probs.

    Args:
        config: algorithm settings.
        experience: from :func:`~megatron_rlhf.algorithms.make_experience.make_experience`.
        logprobs: ``[B, T]`` log pi_theta of the experience's tokens (requires grad).
        entropy: ``[B, T]`` policy entropy; required when ``config.entropy_coef > 0``.
        kl_coef: current KL coefficient (``controller.value``); used when kl_mode == "loss".
        check_finite_inputs: raise NonFiniteError on NaN/Inf at response tokens.
    """
    mask = experience.response_mask
    reduction = config.loss_reduction
    is_weights = None
    if config.rollout_is != "none":
        if experience.rollout_logprobs is None:
            raise BatchShapeError(f"rollout_is={config.rollout_is!r} needs Experience.rollout_logprobs; got None")
        is_weights = truncated_is_weights(experience.old_logprobs, experience.rollout_logprobs, mask,
                                          config.rollout_is, config.rollout_is_threshold)
    policy = ppo_policy_loss(
        logprobs,
        experience.old_logprobs,
        experience.advantages,
        mask,
        config.ppo_clip_low,
        config.ppo_clip_high,
        config.dual_clip,
        reduction,
        check_finite_inputs=check_finite_inputs,
        is_weights=is_weights,
    )
    zero = policy.loss.new_zeros(())
    kl_term = zero
    if config.kl_mode == "loss":
        if experience.ref_logprobs is None:
            raise BatchShapeError('kl_mode="loss" needs Experience.ref_logprobs; got None')
        kl_term = kl_loss(
            logprobs,
            experience.ref_logprobs,
            mask,
            config.kl_estimator,
            reduction,
            check_finite_inputs=check_finite_inputs,
        )
    entropy_term = zero
    if config.entropy_coef > 0:
        if entropy is None:
            raise BatchShapeError(
                f"entropy_coef={config.entropy_coef} needs the policy entropy; got None"
            )
        entropy_term = entropy_bonus_loss(
            entropy, mask, config.entropy_coef, reduction, check_finite_inputs=check_finite_inputs
        )
    total = policy.loss + kl_coef * kl_term + entropy_term
    return ActorLossOutput(total, policy.loss, kl_term, entropy_term, policy.metrics)


def critic_loss(
    config: AlgorithmConfig,
    experience: Experience,
    values: Tensor,
    *,
    check_finite_inputs: bool = True,
) -> ValueLossOutput:
    """Clipped value loss of the critic's current ``[B, T]`` predictions ("gae" experiences)."""
    if experience.returns is None or experience.old_values is None:
        raise BatchShapeError(
            "critic_loss needs Experience.returns and old_values (advantage_estimator 'gae'); "
            "got None"
        )
    return clipped_value_loss(
        values,
        experience.old_values,
        experience.returns,
        experience.response_mask,
        config.value_clip,
        config.loss_reduction,
        check_finite_inputs=check_finite_inputs,
    )
