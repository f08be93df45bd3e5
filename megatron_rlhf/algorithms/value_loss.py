"""Clipped value (critic) loss for PPO.

Per response token, with critic prediction ``V``, the values at rollout time ``V_old`` and the
GAE returns ``R`` (:mod:`.gae`):

    loss_t = 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)

the value clipping of OpenAI's PPO2 baselines (Schulman et al. 2017 code; kept by Ziegler et al.
2019 and OpenRLHF). ``value_clip=None`` gives the plain ``0.5 * (V - R)^2``. Reduction by name
(:mod:`.reductions`).

Non-finite handling as in :mod:`.policy_loss`: padding may hold anything (value and gradient at
padding exactly 0); NaN/Inf at response tokens raise NonFiniteError when ``check_finite_inputs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rlhf.algorithms.errors import AlgorithmConfigError
from megatron_rlhf.algorithms.finite import check_all_finite
from megatron_rlhf.algorithms.masks import (
    as_bool_mask,
    check_token_shapes,
    compute_dtype,
    zero_padding,
)
from megatron_rlhf.algorithms.reductions import masked_reduce, token_mean


@dataclass(frozen=True)
class ValueLossOutput:
    """Result of :func:`clipped_value_loss`."""

    loss: Tensor
    """``[]`` reduced loss, differentiable w.r.t. ``values``."""
    token_loss: Tensor
    """``[B, T]`` per-token loss, 0 at padding."""
    clip_fraction: Tensor
    """``[]`` detached: fraction of response tokens where the clipped term is the larger one
    (strictly), i.e. where clipping decided the loss; 0 for an empty mask or no clipping."""


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    value_clip: float | None = 0.2,
    reduction: str = "token_mean",
    *,
    check_finite_inputs: bool = True,
) -> ValueLossOutput:
    """Clipped value loss.

    Args:
        values: ``[B, T]`` current critic predictions (requires grad).
        old_values: ``[B, T]`` critic predictions at rollout time.
        returns: ``[B, T]`` targets (GAE returns).
        response_mask: ``[B, T]`` 1 at response tokens.
        value_clip: eps > 0 of the clip around ``old_values``, or None for no clipping.
        reduction: name of the reduction (see :mod:`.reductions`).
        check_finite_inputs: raise NonFiniteError on NaN/Inf at response tokens.
    """
    if value_clip is not None and not value_clip > 0:
        raise AlgorithmConfigError(f"value_clip must be > 0 or None; got {value_clip}")
    mask = as_bool_mask(response_mask)
    check_token_shapes(mask, values=values, old_values=old_values, returns=returns)
    if check_finite_inputs:
        check_all_finite({"values": values, "old_values": old_values, "returns": returns}, mask)
    dtype = compute_dtype(values, old_values, returns)
    values = zero_padding(values, mask, dtype)
    old_values = zero_padding(old_values, mask, dtype)
    returns = zero_padding(returns, mask, dtype)
    unclipped = (values - returns).square()
    if value_clip is None:
        token_loss = 0.5 * unclipped
        clip_active = torch.zeros_like(mask)
    else:
        clipped_values = torch.clamp(values, old_values - value_clip, old_values + value_clip)
        clipped = (clipped_values - returns).square()
        token_loss = 0.5 * torch.maximum(unclipped, clipped)
        clip_active = clipped > unclipped
    token_loss = zero_padding(token_loss, mask)
    with torch.no_grad():
        clip_fraction = token_mean(clip_active.to(dtype), mask)
    return ValueLossOutput(masked_reduce(token_loss, mask, reduction), token_loss, clip_fraction)
