"""Critic-free, group-relative sequence advantages: GRPO and RLOO.

Both compare each response with the other responses sampled for the *same prompt* (its group,
``group_index`` ``[B]``, see :mod:`.groups`), so no value network is needed.

* GRPO (Shao et al., "DeepSeekMath", 2024, outcome supervision):
  ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)``; with ``normalize_std=False`` only the mean is
  subtracted (Dr. GRPO, Liu et al. 2025). std is the **unbiased (n - 1)** group std, like
  ``torch.std`` and OpenRLHF / verl.
* RLOO (Ahmadian et al., "Back to Basics", 2024; Kool et al. 2019): leave-one-out baseline
  ``A_i = r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean_g(r))``.

Guards: a group of one sample gets advantage exactly 0 for both (there is nothing to compare
with), and a group of identical rewards gets exactly 0 (no ``0 / eps`` noise): see
:func:`~megatron_rlhf.algorithms.groups.group_moments`. Rewards must be finite (NaN/Inf raises
NonFiniteError: a reward-function bug must not be averaged into a whole group).

Shapes: ``rewards`` ``[B]`` -> advantages ``[B]``; with ``response_mask`` ``[B, T]`` given, the
sequence advantage is broadcast to every response token (0 at padding), ``[B, T]``.
"""

from __future__ import annotations

from torch import Tensor

from megatron_rlhf.algorithms.errors import AlgorithmConfigError, BatchShapeError
from megatron_rlhf.algorithms.finite import check_finite
from megatron_rlhf.algorithms.groups import group_moments
from megatron_rlhf.algorithms.masks import broadcast_to_tokens


def _checked(rewards: Tensor) -> Tensor:
    if rewards.dim() != 1:
        raise BatchShapeError(f"rewards must be [B]; got shape {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    return rewards


def grpo_advantages(
    rewards: Tensor,
    group_index: Tensor,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
    response_mask: Tensor | None = None,
) -> Tensor:
    """GRPO group-relative advantages.

    Args:
        rewards: ``[B]`` sequence rewards.
        group_index: ``[B]`` int64 prompt id of each sample (any ids, any order).
        normalize_std: divide by ``std_g + eps`` (GRPO) or not (Dr. GRPO).
        eps: > 0, added to the std.
        response_mask: optional ``[B, T]``; if given the result is broadcast to tokens.

    Returns:
        ``[B]`` (or ``[B, T]``) advantages in the rewards' float dtype (>= float32).
    """
    if not eps > 0:
        raise AlgorithmConfigError(f"GRPO eps must be > 0; got {eps}")
    moments = group_moments(_checked(rewards), group_index)
    advantages = moments.deviation / (moments.std + eps) if normalize_std else moments.deviation
    return advantages if response_mask is None else broadcast_to_tokens(advantages, response_mask)


def rloo_advantages(
    rewards: Tensor, group_index: Tensor, *, response_mask: Tensor | None = None
) -> Tensor:
    """RLOO leave-one-out advantages ``r_i - mean_{j != i} r_j``; 0 for single-sample groups.

    Args and returns as :func:`grpo_advantages` (no std, no eps).
    """
    moments = group_moments(_checked(rewards), group_index)
    count = moments.count.to(moments.deviation.dtype)
    scale = count / (count - 1).clamp(min=1)
    advantages = moments.deviation * scale.where(moments.count > 1, count.new_zeros(()))
    return advantages if response_mask is None else broadcast_to_tokens(advantages, response_mask)
