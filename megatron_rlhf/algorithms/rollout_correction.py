"""Truncated importance sampling (TIS) between the rollout engine's policy and the trainer's.

The engine that sampled a response (vLLM, maybe in another precision such as FP8, maybe one
weight version behind in one-step-off-policy mode) is not exactly the policy the trainer computes
``old_logprobs`` with. With ``mu`` the engine's sampling distribution and ``pi_old`` the trainer's,
the PPO loss of a token is multiplied by a detached importance weight (Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training"; Espeholt et al. 2018's
truncation)::

    token level:     w_t = min(pi_old(y_t) / mu(y_t), C)
    sequence level:  w   = min(prod_t pi_old(y_t) / mu(y_t), C)      (one weight per response)

``C`` is ``threshold`` (> 0). The weights are computed in log space (``log w`` capped at
``log C`` before ``exp``), so a long response's product never overflows; the log-ratio of each
token is clamped to [-20, 20] like the PPO ratio's (:data:`~megatron_rlhf.algorithms.kl.LOG_RATIO_CLAMP`).

Guarantees (pure functions, no host sync, inputs never modified): weights are detached and
finite, > 0 and <= ``threshold`` at response tokens and exactly 1 at padding (so a padded token's
loss stays 0 whatever the weight); a sequence-level weight is the same for every token of its
response. Empty responses get weight 1.

Not covered: importance *ratios* above the threshold are truncated, never re-normalised (no
self-normalised IS); masking whole sequences whose ratio is extreme (rejection) is not done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rlhf.algorithms.errors import AlgorithmConfigError
from megatron_rlhf.algorithms.kl import LOG_RATIO_CLAMP
from megatron_rlhf.algorithms.masks import as_bool_mask, check_token_shapes
from megatron_rlhf.algorithms.reductions import token_mean

ROLLOUT_IS_LEVELS = ("none", "token", "sequence")


def check_rollout_is(level: str, threshold: float) -> None:
    """Raise AlgorithmConfigError unless ``level`` is known and ``threshold`` is finite and > 0."""
    if level not in ROLLOUT_IS_LEVELS:
        raise AlgorithmConfigError(f"rollout_is={level!r}; choose one of: {', '.join(ROLLOUT_IS_LEVELS)}")
    if not (isinstance(threshold, (int, float)) and threshold > 0 and threshold < float("inf")):
        raise AlgorithmConfigError(f"rollout_is_threshold must be finite and > 0; got {threshold}")


def rollout_log_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """``[B, T]`` clamped ``log pi_old - log mu`` at response tokens, 0 at padding (float32 or wider)."""
    mask = as_bool_mask(response_mask)
    check_token_shapes(mask, old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    dtype = torch.promote_types(torch.promote_types(old_logprobs.dtype, rollout_logprobs.dtype), torch.float32)
    difference = old_logprobs.detach().to(dtype) - rollout_logprobs.detach().to(dtype)
    difference = torch.where(mask, difference, torch.zeros_like(difference))
    return difference.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor,
                         level: str, threshold: float) -> Tensor:
    """``[B, T]`` detached truncated importance weights (module docstring); all ones for ``"none"``."""
    check_rollout_is(level, threshold)
    mask = as_bool_mask(response_mask)
    log_ratio = rollout_log_ratio(old_logprobs, rollout_logprobs, mask)
    if level == "none":
        return torch.ones_like(log_ratio)
    cap = torch.log(torch.tensor(float(threshold), dtype=log_ratio.dtype))
    if level == "token":
        log_weight = log_ratio
    else:
        log_weight = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
    weights = torch.exp(torch.minimum(log_weight, cap))
    return torch.where(mask, weights, torch.ones_like(weights))


@dataclass(frozen=True)
class RolloutCorrectionStats:
    """Diagnostics of the rollout/trainer mismatch over response tokens; ``[]`` detached tensors."""

    mismatch_kl: Tensor
    """Token mean of k3 = ``r - 1 - log r`` with ``r = pi_old / mu``: an estimate of KL(mu || pi_old)
    from the engine's own samples (0 when both policies agree; >= 0)."""
    log_ratio_abs_max: Tensor
    """Largest ``|log pi_old - log mu|`` at a response token (0 for an empty mask)."""
    weight_mean: Tensor
    """Token mean of the truncated weights (1 for an empty mask or level "none")."""
    weight_max: Tensor
    """Largest truncated weight (1 for an empty mask)."""
    weight_min: Tensor
    """Smallest truncated weight (1 for an empty mask)."""
    truncated_fraction: Tensor
    """Fraction of response tokens whose untruncated weight exceeded the threshold."""


def rollout_correction_stats(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor,
                             level: str, threshold: float) -> RolloutCorrectionStats:
    """The mismatch KL and the IS weights' statistics of one batch (pure, no host sync)."""
    mask = as_bool_mask(response_mask)
    log_ratio = rollout_log_ratio(old_logprobs, rollout_logprobs, mask)
    weights = truncated_is_weights(old_logprobs, rollout_logprobs, mask, level, threshold)
    one = log_ratio.new_ones(())
    any_token = mask.any()
    if level == "sequence":
        raw_log = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)
    else:
        raw_log = log_ratio
    over = (raw_log > torch.log(torch.tensor(float(threshold), dtype=raw_log.dtype))) & mask
    if level == "none":
        over = torch.zeros_like(mask)
    big, small = torch.finfo(weights.dtype).max, torch.finfo(weights.dtype).min
    return RolloutCorrectionStats(
        # k3 = r - 1 - log r >= 0; expm1 keeps r - 1 exact for r near 1, and the clamp removes the
        # rounding below 0 (a policy and engine that agree to ~1e-7 in log-prob gave -1e-9)
        mismatch_kl=token_mean((torch.expm1(log_ratio) - log_ratio).clamp_min(0.0), mask),
        log_ratio_abs_max=torch.where(mask, log_ratio.abs(), torch.zeros_like(log_ratio)).amax()
        if log_ratio.numel() else log_ratio.new_zeros(()),
        weight_mean=torch.where(any_token, token_mean(weights, mask), one),
        weight_max=torch.where(any_token, torch.where(mask, weights, torch.full_like(weights, small)).amax()
                               if weights.numel() else one, one),
        weight_min=torch.where(any_token, torch.where(mask, weights, torch.full_like(weights, big)).amin()
                               if weights.numel() else one, one),
        truncated_fraction=token_mean(over.to(weights.dtype), mask),
    )
