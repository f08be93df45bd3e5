"""Sequence-level reward shaping, in the order "Does RLHF Scale?" applies it.

"Does RLHF Scale? Exploring the Impacts from Data, Model, and Method" (Hou et al. 2024, Sec. 3
and 3.2) samples several responses per prompt and applies "additional reward clipping and
normalization" to the reward-model score before policy optimisation, and for the critic-free
methods (GRPO, REINFORCE) additionally an *asymmetric reward shrinking*. The order used by
:func:`~megatron_rlhf.algorithms.make_experience.make_experience` is therefore:

1. :func:`clip_rewards` -- clamp to ``[low, high]``;
2. normalisation, by name (:data:`REWARD_NORMALIZATIONS`): ``"none"``, ``"group"`` (over the n
   responses of each prompt, the paper's normalisation), ``"batch"`` (over the whole batch) or
   ``"domain"`` (running per-domain moments, :mod:`.domain_normalization`), each
   ``(r - mean) / (std + eps)`` with the unbiased std;
3. (critic-free estimators) the group baseline of the estimator (GRPO/RLOO);
4. :func:`asymmetric_shrink` -- critic-free estimators only.

All functions take and return ``[B]`` sequence-level rewards, raise NonFiniteError on a NaN/Inf
reward (a broken reward function must not train silently) and return the input float dtype (at
least float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from megatron_rlhf.algorithms.domain_normalization import DomainRewardStats, normalize_by_domain
from megatron_rlhf.algorithms.errors import AlgorithmConfigError, BatchShapeError
from megatron_rlhf.algorithms.finite import check_finite
from megatron_rlhf.algorithms.groups import batch_moments, group_moments
from megatron_rlhf.algorithms.masks import compute_dtype
from megatron_rlhf.algorithms.registry import Registry


def _check_rewards(rewards: Tensor) -> Tensor:
    if rewards.dim() != 1:
        raise BatchShapeError(f"rewards must be [B]; got shape {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    return rewards.to(compute_dtype(rewards))


def clip_rewards(rewards: Tensor, low: float, high: float) -> Tensor:
    """``[B]`` rewards clamped to ``[low, high]`` (``low < high``, both finite)."""
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise AlgorithmConfigError(
            f"reward clip range must be finite with low < high; got ({low}, {high})"
        )
    return _check_rewards(rewards).clamp(min=low, max=high)


def normalize_in_groups(rewards: Tensor, group_index: Tensor, eps: float = 1e-6) -> Tensor:
    """``[B]`` ``(r - mean_g) / (std_g + eps)`` within each prompt's group (unbiased std).

    Groups of one sample and groups of identical rewards map to exactly 0.
    """
    _check_eps(eps)
    moments = group_moments(_check_rewards(rewards), group_index)
    return moments.deviation / (moments.std + eps)


def normalize_in_batch(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """``[B]`` ``(r - mean) / (std + eps)`` over the whole batch (unbiased std); B <= 1 gives 0."""
    _check_eps(eps)
    moments = batch_moments(_check_rewards(rewards))
    return moments.deviation / (moments.std + eps)


def asymmetric_shrink(rewards: Tensor, alpha: float) -> Tensor:
    """Asymmetric reward shrinking of "Does RLHF Scale?" (Sec. 3.2), for critic-free methods.

    The paper maps rewards "in an asymmetric way" with a constant in (0, 1) to damp the negative
    gradients that destabilised its critic-free runs; its formula did not survive in our copy of
    the text. Implemented reading: **non-negative rewards pass unchanged, negative rewards are
    multiplied by ``alpha``**: ``r if r >= 0 else alpha * r``. ``alpha = 1`` is the identity.

    Args:
        rewards: ``[B]`` (normally already clipped and normalised).
        alpha: scale of negative rewards, in (0, 1].
    """
    if not (0.0 < alpha <= 1.0):
        raise AlgorithmConfigError(f"reward shrink alpha must be in (0, 1]; got {alpha}")
    rewards = _check_rewards(rewards)
    return rewards.where(rewards >= 0, rewards * alpha)


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise AlgorithmConfigError(f"normalisation eps must be > 0; got {eps}")


@dataclass(frozen=True)
class NormalizationInputs:
    """What the normalisations may need besides the rewards (unused fields may be None)."""

    group_index: Tensor | None = None
    """``[B]`` int64 prompt id of each sample; needed by ``"group"``."""
    domain_ids: Tensor | None = None
    """``[B]`` int64 domain id of each sample; needed by ``"domain"``."""
    domain_stats: DomainRewardStats | None = None
    """Running per-domain moments so far; ``"domain"`` starts from empty stats if None."""
    eps: float = 1e-6
    """Added to the std in the denominator; > 0."""


NormalizationFn = Callable[[Tensor, NormalizationInputs], tuple[Tensor, DomainRewardStats | None]]
REWARD_NORMALIZATIONS: Registry[NormalizationFn] = Registry("reward normalization")


@REWARD_NORMALIZATIONS.register("none")
def _no_normalization(rewards: Tensor, inputs: NormalizationInputs) -> tuple[Tensor, None]:
    return _check_rewards(rewards), None


@REWARD_NORMALIZATIONS.register("group")
def _group_normalization(rewards: Tensor, inputs: NormalizationInputs) -> tuple[Tensor, None]:
    if inputs.group_index is None:
        raise BatchShapeError('reward normalization "group" needs group_index; got None')
    return normalize_in_groups(rewards, inputs.group_index, inputs.eps), None


@REWARD_NORMALIZATIONS.register("batch")
def _batch_normalization(rewards: Tensor, inputs: NormalizationInputs) -> tuple[Tensor, None]:
    return normalize_in_batch(rewards, inputs.eps), None


@REWARD_NORMALIZATIONS.register("domain")
def _domain_normalization(
    rewards: Tensor, inputs: NormalizationInputs
) -> tuple[Tensor, DomainRewardStats]:
    if inputs.domain_ids is None:
        raise BatchShapeError('reward normalization "domain" needs domain_ids; got None')
    stats = inputs.domain_stats if inputs.domain_stats is not None else DomainRewardStats()
    return normalize_by_domain(rewards, inputs.domain_ids, stats, inputs.eps)


def normalize_rewards(
    rewards: Tensor, kind: str, inputs: NormalizationInputs
) -> tuple[Tensor, DomainRewardStats | None]:
    """``[B]`` rewards normalised by the normalisation named ``kind``, and the new domain stats
    (None unless ``kind == "domain"``)."""
    return REWARD_NORMALIZATIONS.get(kind)(rewards, inputs)
