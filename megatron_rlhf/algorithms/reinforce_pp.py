"""REINFORCE++: discounted returns-to-go, normalised over the whole batch instead of a critic.

J. Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models" (2025),
as implemented in OpenRLHF (the framework "Does RLHF Scale?" trained with):

    G_t = r_t + gamma * m_{t+1} * G_{t+1}                (returns-to-go over response tokens)
    A_t = (G_t - mean(G)) / (std(G) + eps)               (mean, std over *all response tokens
                                                          of the batch*, unbiased std)

where ``r_t`` is the per-token reward (sequence reward at the last response token plus the
per-token KL penalty). ``G`` is GAE with ``V = 0`` and ``lambda = 1``, and is computed that way.
With ``group_index`` given (the "REINFORCE++-baseline" variant) the group mean of the sequence
rewards is subtracted *before* the returns are formed; that step lives in the estimator registry
(:mod:`.advantages`), this module only handles token-level tensors.

Guards: an empty mask gives all zeros; a batch with one response token, or with all returns
equal, gives exactly 0 (the mean is taken after shifting by the batch maximum). Non-finite
rewards at response tokens raise NonFiniteError; padding may hold anything.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rlhf.algorithms.errors import AlgorithmConfigError
from megatron_rlhf.algorithms.gae import gae_advantages
from megatron_rlhf.algorithms.masks import as_bool_mask, check_token_shapes, zero_padding


def discounted_returns(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``[B, T]`` returns-to-go ``G_t = sum_{k >= t} gamma^(k - t) r_k`` within each response."""
    zero_values = torch.zeros_like(token_rewards)
    returns, _ = gae_advantages(token_rewards, zero_values, response_mask, gamma, 1.0)
    return returns


def whiten_over_tokens(token_values: Tensor, response_mask: Tensor, eps: float = 1e-6) -> Tensor:
    """``[B, T]`` ``(x - mean) / (std + eps)`` over all response tokens of the batch, 0 at padding.

    Unbiased std (``count - 1``); fewer than two tokens gives std 0. No host sync.
    """
    if not eps > 0:
        raise AlgorithmConfigError(f"whitening eps must be > 0; got {eps}")
    mask = as_bool_mask(response_mask)
    check_token_shapes(mask, token_values=token_values)
    values = zero_padding(token_values, mask)
    count = mask.sum().to(values.dtype)
    if values.numel():
        shift = torch.where(mask, values, torch.full_like(values, float("-inf"))).amax()
        shift = torch.where(mask.any(), shift, torch.zeros_like(shift))
    else:
        shift = values.new_zeros(())
    centered = zero_padding(values - shift, mask)
    deviation = zero_padding(centered - centered.sum() / count.clamp(min=1), mask)
    variance = deviation.square().sum() / (count - 1).clamp(min=1)
    std = torch.where(count > 1, variance.sqrt(), torch.zeros_like(variance))
    return deviation / (std + eps)


def reinforce_pp_advantages(
    token_rewards: Tensor, response_mask: Tensor, *, gamma: float = 1.0, eps: float = 1e-6
) -> Tensor:
    """REINFORCE++ advantages ``[B, T]``: batch-whitened discounted returns, 0 at padding.

    Args:
        token_rewards: ``[B, T]`` per-token rewards.
        response_mask: ``[B, T]`` 1 at response tokens.
        gamma: discount in [0, 1] (1 in the paper's setting).
        eps: > 0, added to the batch std.
    """
    returns = discounted_returns(token_rewards, response_mask, gamma)
    return whiten_over_tokens(returns, response_mask, eps)
