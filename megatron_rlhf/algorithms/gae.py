"""Generalised Advantage Estimation per response token, for PPO with a critic.

Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
(2016), applied per token as in RLHF PPO (Ziegler et al. 2019; Ouyang et al. 2022; "Does RLHF
Scale?" Sec. 3.2 uses it for its PPO runs). With ``m_t`` the response mask:

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lambda * m_{t+1} * A_{t+1}
    R_t     = A_t + V_t                       (critic targets, "returns")

and ``V_T = m_T = 0`` past the end, so the value after the last response token is 0 (the
response ended; nothing to bootstrap). Computed only at response tokens: A and R are exactly 0 at
padding, and padding positions of ``token_rewards`` / ``values`` may hold anything (they are
replaced by 0 before the recursion).

The mask is expected right-padded (the package convention). The formula above is what is
computed for any mask, so a 0 *inside* a row acts as an episode boundary (nothing flows across
it); callers that need multi-segment credit assignment must not rely on that.

Cost: a Python loop over T of ``[B]``-sized ops (as in OpenRLHF and verl); no gradient is needed
(advantages are targets), so callers normally run it under ``torch.no_grad()``.
"""

from __future__ import annotations

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


def check_discount(name: str, value: float) -> None:
    """Raise AlgorithmConfigError unless ``0 <= value <= 1`` (gamma, lambda)."""
    if not (0.0 <= value <= 1.0):
        raise AlgorithmConfigError(f"{name} must be in [0, 1]; got {value}")


def shift_left(token_values: Tensor) -> Tensor:
    """``[B, T]`` -> ``[B, T]`` with position t holding position t + 1's value, 0 at t = T - 1."""
    if token_values.shape[1] == 0:
        return token_values
    return torch.cat([token_values[:, 1:], torch.zeros_like(token_values[:, :1])], dim=1)


def gae_advantages(
    token_rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """GAE advantages and returns, both ``[B, T]``, 0 at padding.

    Args:
        token_rewards: ``[B, T]`` per-token reward r_t (sequence reward at the last response token,
            plus any per-token KL penalty).
        values: ``[B, T]`` critic estimate V_t at each response token.
        response_mask: ``[B, T]`` 1 at response tokens.
        gamma: discount, in [0, 1].
        lam: GAE lambda, in [0, 1].

    Non-finite ``token_rewards`` or ``values`` at response tokens raise NonFiniteError.
    Output dtype: the inputs' promoted float dtype, at least float32.
    """
    check_discount("gamma", gamma)
    check_discount("lambda", lam)
    mask = as_bool_mask(response_mask)
    check_token_shapes(mask, token_rewards=token_rewards, values=values)
    check_all_finite({"token_rewards": token_rewards, "values": values}, mask)
    dtype = compute_dtype(token_rewards, values)
    rewards = zero_padding(token_rewards, mask, dtype)
    values = zero_padding(values, mask, dtype)
    next_values = shift_left(values)
    next_mask = shift_left(mask.to(dtype))
    deltas = rewards + gamma * next_values - values
    carry = gamma * lam * next_mask
    running = deltas.new_zeros(deltas.shape[0])
    reversed_advantages = []
    for t in reversed(range(deltas.shape[1])):
        running = deltas[:, t] + carry[:, t] * running
        reversed_advantages.append(running)
    if reversed_advantages:
        advantages = torch.stack(reversed_advantages[::-1], dim=1)
    else:
        advantages = deltas.new_zeros(deltas.shape)
    advantages = zero_padding(advantages, mask)
    returns = zero_padding(advantages + values, mask)
    return advantages, returns
