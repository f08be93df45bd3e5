"""Per-token KL estimators between the policy and the reference (SFT) model, and their two uses.

Estimated quantity: ``KL(pi || pi_ref)``, from tokens *sampled from pi* (the rollout policy),
with ``log_ratio = logprobs - ref_logprobs = log pi(a|s) - log pi_ref(a|s)`` per token. The three
estimators of J. Schulman, "Approximating KL Divergence" (2020), registry keys of
:data:`KL_ESTIMATORS`:

* ``"k1"`` = ``log_ratio``; unbiased, high variance, can be negative.
* ``"k2"`` = ``0.5 * log_ratio**2``; biased, low variance, >= 0.
* ``"k3"`` = ``exp(-log_ratio) - 1 + log_ratio``; unbiased, low variance, >= 0 (the estimator of
  GRPO's KL loss, Shao et al. 2024).

To keep ``k3`` finite, ``log_ratio`` is clamped to ``[-20, 20]`` before the exponential (exp(20)
~ 4.9e8); inside that range every estimator is the exact formula. k1 and k2 are not clamped.

Two uses, chosen by ``AlgorithmConfig.kl_mode``:

* ``"penalty"`` -- :func:`kl_penalty_rewards`: ``-coef * kl_t`` added to the per-token reward
  before advantage estimation (Ziegler et al. 2019; Ouyang et al. 2022), with the rollout
  policy's log-probs, no gradient.
* ``"loss"`` -- :func:`kl_loss`: ``coef * reduce(kl_t)`` added to the actor loss, with the current
  policy's log-probs, differentiable (GRPO, Shao et al. 2024).

Padding positions (``response_mask`` 0) come out as exactly 0 and may hold anything on input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from megatron_rlhf.algorithms.finite import check_all_finite
from megatron_rlhf.algorithms.masks import (
    as_bool_mask,
    check_token_shapes,
    compute_dtype,
    zero_padding,
)
from megatron_rlhf.algorithms.reductions import masked_reduce
from megatron_rlhf.algorithms.registry import Registry

LOG_RATIO_CLAMP = 20.0
"""|log pi - log pi_ref| is clamped to this before exp() in k3, so the estimate stays finite."""

KLEstimator = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


def _log_ratio(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
            "must have the same shape"
        )
    dtype = compute_dtype(logprobs, ref_logprobs)
    return logprobs.to(dtype) - ref_logprobs.to(dtype)


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Elementwise ``log pi - log pi_ref`` (any shape, unmasked)."""
    return _log_ratio(logprobs, ref_logprobs)


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Elementwise ``0.5 * (log pi - log pi_ref)**2`` (any shape, unmasked)."""
    return 0.5 * _log_ratio(logprobs, ref_logprobs).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Elementwise ``exp(-x) - 1 + x`` with ``x = log pi - log pi_ref`` clamped to [-20, 20]."""
    log_ratio = _log_ratio(logprobs, ref_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(-log_ratio) + log_ratio


def kl_estimate(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    estimator: str,
    *,
    check_finite_inputs: bool = True,
) -> Tensor:
    """``[B, T]`` per-token KL estimate named ``estimator``; exactly 0 at padding.

    Args:
        logprobs: ``[B, T]`` log pi(token) of the sampled tokens.
        ref_logprobs: ``[B, T]`` log pi_ref(token) of the same tokens.
        response_mask: ``[B, T]``; padding may hold anything in the log-prob tensors.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        check_finite_inputs: raise NonFiniteError on NaN/Inf at response tokens (one host sync).
    """
    mask = as_bool_mask(response_mask)
    check_token_shapes(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    function = KL_ESTIMATORS.get(estimator)
    if check_finite_inputs:
        check_all_finite({"logprobs": logprobs, "ref_logprobs": ref_logprobs}, mask)
    dtype = compute_dtype(logprobs, ref_logprobs)
    kl = function(zero_padding(logprobs, mask, dtype), zero_padding(ref_logprobs, mask, dtype))
    return zero_padding(kl, mask)


def kl_penalty_rewards(kl: Tensor, response_mask: Tensor, coef: float) -> Tensor:
    """``[B, T]`` per-token reward ``-coef * kl`` (0 at padding), to add to the token rewards.

    ``kl`` is a ``[B, T]`` estimate from :func:`kl_estimate`; ``coef`` >= 0 (from a KL controller).
    """
    if not coef >= 0:
        raise ValueError(f"KL coefficient must be >= 0; got {coef}")
    mask = as_bool_mask(response_mask)
    check_token_shapes(mask, kl=kl)
    return zero_padding(-coef * zero_padding(kl, mask), mask)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    estimator: str = "k3",
    reduction: str = "token_mean",
    *,
    check_finite_inputs: bool = True,
) -> Tensor:
    """``[]`` KL term for the actor loss: the per-token estimate reduced by ``reduction``.

    Not multiplied by the coefficient (the caller adds ``coef * kl_loss``). Differentiable w.r.t.
    ``logprobs`` (the current policy). 0 for an empty mask.
    """
    kl = kl_estimate(
        logprobs, ref_logprobs, response_mask, estimator, check_finite_inputs=check_finite_inputs
    )
    return masked_reduce(kl, response_mask, reduction)
