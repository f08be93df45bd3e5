"""Entropy bonus for the actor loss.

The loss term is ``-coef * reduce(entropy_t)``: subtracting the policy's per-token entropy (in
nats, from :func:`megatron_rlhf.models.logprobs.vocab_parallel_entropy`) rewards keeping the
output distribution spread out (Williams & Peng 1991; Mnih et al. 2016; the entropy term of the
PPO objective, Schulman et al. 2017). "Exploring Data Scaling Trends in RLHF" (Shen et al. 2025)
tracks the fall of response entropy during RLHF as a loss of diversity; this is the knob that
counteracts it. Reduction by name (:mod:`.reductions`).

Non-finite handling: padding may hold anything; NaN/Inf at response tokens raise NonFiniteError
when ``check_finite_inputs``.
"""

from __future__ import annotations

import math

from torch import Tensor

from megatron_rlhf.algorithms.errors import AlgorithmConfigError
from megatron_rlhf.algorithms.finite import check_finite
from megatron_rlhf.algorithms.masks import as_bool_mask, check_token_shapes
from megatron_rlhf.algorithms.reductions import masked_reduce


def entropy_bonus_loss(
    entropy: Tensor,
    response_mask: Tensor,
    coef: float,
    reduction: str = "token_mean",
    *,
    check_finite_inputs: bool = True,
) -> Tensor:
    """``[]`` ``-coef * reduce(entropy)``, to add to the actor loss; 0 for an empty mask.

    Args:
        entropy: ``[B, T]`` per-token policy entropy (nats), differentiable.
        response_mask: ``[B, T]`` 1 at response tokens.
        coef: entropy coefficient, finite and >= 0 (0 disables the bonus).
        reduction: name of the reduction (see :mod:`.reductions`).
        check_finite_inputs: raise NonFiniteError on NaN/Inf at response tokens.
    """
    if not (math.isfinite(coef) and coef >= 0):
        raise AlgorithmConfigError(f"entropy coefficient must be finite and >= 0; got {coef}")
    mask = as_bool_mask(response_mask)
    check_token_shapes(mask, entropy=entropy)
    if check_finite_inputs:
        check_finite("entropy", entropy, mask)
    return -coef * masked_reduce(entropy, mask, reduction)
