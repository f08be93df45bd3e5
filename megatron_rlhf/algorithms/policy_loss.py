"""PPO clipped surrogate policy loss, with separate low/high clip and optional dual clip.

Per response token, with ``ratio = exp(logprobs - old_logprobs)`` (pi_theta / pi_old) and
advantage ``A``:

    loss_t = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)    (Schulman et al. 2017)
    if dual_clip c > 1 and A < 0:  loss_t = min(loss_t, -c * A)               (Ye et al. 2020)

Separate ``clip_low`` / ``clip_high`` is DAPO's "clip-higher" (Yu et al. 2025); equal values give
the symmetric PPO clip. The dual clip bounds the loss of a negative-advantage token whose ratio
exploded (Ye et al., "Mastering Complex Control in MOBA Games with Deep RL", 2020).

When ``logprobs == old_logprobs`` the ratio is exactly 1 and ``loss_t = -A``, whose gradient is
that of the plain policy-gradient loss ``-A * logprobs``.

Rollout correction: ``is_weights`` (truncated importance weights of the trainer's old policy
against the engine's sampling policy, :mod:`.rollout_correction`) multiply ``loss_t`` when given.

Reduction of ``loss_t`` to a scalar: by name (:mod:`.reductions`). Metrics are token means over
the batch (independent of the loss reduction).

Non-finite handling: padding may hold anything (replaced by 0 first; value and gradient at padding
are exactly 0). NaN/Inf at response tokens raise NonFiniteError when ``check_finite_inputs``
(default; one host sync). The log-ratio is clamped to [-20, 20] before exp() so the ratio stays
finite; the clamp has no effect on any token within e^20 of the old policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rlhf.algorithms.errors import AlgorithmConfigError
from megatron_rlhf.algorithms.finite import check_all_finite
from megatron_rlhf.algorithms.kl import LOG_RATIO_CLAMP
from megatron_rlhf.algorithms.masks import (
    as_bool_mask,
    check_token_shapes,
    compute_dtype,
    zero_padding,
)
from megatron_rlhf.algorithms.reductions import masked_min_max, masked_reduce, token_mean


@dataclass(frozen=True)
class PolicyLossMetrics:
    """Diagnostics of one policy-loss call; all ``[]`` detached tensors (no host sync)."""

    clip_fraction: Tensor
    """Fraction of response tokens where the clipped term is active (strictly smaller than the
    unclipped one, so the token has no gradient); 0 for an empty mask."""
    dual_clip_fraction: Tensor
    """Fraction of response tokens where the dual clip bound ``-c * A`` is active."""
    approx_kl: Tensor
    """Token mean of ``(ratio - 1) - log(ratio)``: Schulman's k3 estimate of KL(pi_old || pi_theta)
    from the rollout samples (pi_old)."""
    ratio_mean: Tensor
    """Mean importance ratio over response tokens (1 for an empty mask)."""
    ratio_min: Tensor
    """Smallest ratio over response tokens (1 for an empty mask)."""
    ratio_max: Tensor
    """Largest ratio over response tokens (1 for an empty mask)."""


@dataclass(frozen=True)
class PolicyLossOutput:
    """Result of :func:`ppo_policy_loss`."""

    loss: Tensor
    """``[]`` reduced loss, differentiable w.r.t. ``logprobs``."""
    token_loss: Tensor
    """``[B, T]`` per-token loss, 0 at padding."""
    ratio: Tensor
    """``[B, T]`` importance ratio pi_theta / pi_old (1 at padding), differentiable."""
    metrics: PolicyLossMetrics


def check_clip_settings(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    """Raise AlgorithmConfigError unless 0 <= clip_low < 1, clip_high >= 0 and dual_clip > 1."""
    if not (0.0 <= clip_low < 1.0):
        raise AlgorithmConfigError(f"clip_low (ppo_clip_low) must be in [0, 1); got {clip_low}")
    if not clip_high >= 0.0:
        raise AlgorithmConfigError(f"clip_high (ppo_clip_high) must be >= 0; got {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise AlgorithmConfigError(f"dual clip constant must be > 1 (or None); got {dual_clip}")


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    reduction: str = "token_mean",
    *,
    check_finite_inputs: bool = True,
    is_weights: Tensor | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate loss.

    Args:
        logprobs: ``[B, T]`` log pi_theta(token) of the current policy (requires grad).
        old_logprobs: ``[B, T]`` log pi_old(token) of the rollout policy.
        advantages: ``[B, T]`` per-token advantages.
        response_mask: ``[B, T]`` 1 at response tokens.
        clip_low: ratio clipped below at ``1 - clip_low``; in [0, 1).
        clip_high: ratio clipped above at ``1 + clip_high``; >= 0.
        dual_clip: constant c > 1 of the dual clip, or None for no dual clip.
        reduction: ``"token_mean"``, ``"seq_mean_token_sum"`` or ``"seq_mean_token_mean"``.
        check_finite_inputs: raise NonFiniteError on NaN/Inf at response tokens.
        is_weights: optional ``[B, T]`` detached per-token weights multiplying ``loss_t`` after
            the clip and dual clip (the truncated importance weights of
            :mod:`.rollout_correction`); None: weight 1.
    """
    check_clip_settings(clip_low, clip_high, dual_clip)
    mask = as_bool_mask(response_mask)
    check_token_shapes(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    if check_finite_inputs:
        check_all_finite(
            {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages}, mask
        )
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    log_ratio = zero_padding(logprobs, mask, dtype) - zero_padding(old_logprobs, mask, dtype)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    advantages = zero_padding(advantages, mask, dtype)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    token_loss = -torch.minimum(unclipped, clipped)
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (bound < token_loss) & mask
        token_loss = torch.where(advantages < 0, torch.minimum(token_loss, bound), token_loss)
    if is_weights is not None:
        check_token_shapes(mask, is_weights=is_weights)
        token_loss = token_loss * zero_padding(is_weights.detach(), mask, dtype)
    token_loss = zero_padding(token_loss, mask)
    with torch.no_grad():
        ratio_min, ratio_max = masked_min_max(ratio, mask, 1.0)
        metrics = PolicyLossMetrics(
            clip_fraction=token_mean((clipped < unclipped).to(dtype), mask),
            dual_clip_fraction=token_mean(dual_active.to(dtype), mask),
            approx_kl=token_mean(ratio - 1.0 - log_ratio, mask),
            ratio_mean=torch.where(mask.any(), token_mean(ratio, mask), ratio.new_ones(())),
            ratio_min=ratio_min,
            ratio_max=ratio_max,
        )
    return PolicyLossOutput(
        loss=masked_reduce(token_loss, mask, reduction),
        token_loss=token_loss,
        ratio=ratio,
        metrics=metrics,
    )
