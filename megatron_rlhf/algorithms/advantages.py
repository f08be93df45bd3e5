"""Advantage estimators by name (``AlgorithmConfig.advantage_estimator``).

Every estimator is two stages, so that the paper's asymmetric reward shrinking can sit between
them (see :func:`~megatron_rlhf.algorithms.make_experience.make_experience`):

1. ``sequence_baseline``: ``[B]`` shaped rewards -> ``[B]`` sequence scores (identity for
   estimators without a group baseline);
2. ``token_advantages``: ``[B, T]`` token rewards (score at the last response token + per-token KL
   penalty) -> ``[B, T]`` advantages and, for critic methods, ``[B, T]`` returns.

Registered estimators:

* ``"gae"`` -- PPO with a critic: GAE(gamma, lambda) (:mod:`.gae`); returns are critic targets.
* ``"grpo"`` -- group-relative ``(r - mean_g) / (std_g + eps)``, std optional
  (:mod:`.group_advantages`).
* ``"rloo"`` -- leave-one-out baseline ``r_i - mean_{j != i} r_j``.
* ``"reinforce_pp"`` -- REINFORCE++: returns-to-go whitened over the batch (:mod:`.reinforce_pp`).
* ``"reinforce_pp_baseline"`` -- REINFORCE++ after subtracting the group mean of the rewards.

For the critic-free estimators the token stage of GRPO / RLOO is the discounted return-to-go of
the token rewards (as in OpenRLHF): with no KL penalty and ``gamma = 1`` that is the sequence
advantage broadcast to every response token, as in the GRPO paper; a per-token KL penalty adds
the sum of the remaining penalties.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from megatron_rlhf.algorithms.errors import BatchShapeError
from megatron_rlhf.algorithms.gae import gae_advantages
from megatron_rlhf.algorithms.group_advantages import grpo_advantages, rloo_advantages
from megatron_rlhf.algorithms.groups import group_moments
from megatron_rlhf.algorithms.registry import Registry
from megatron_rlhf.algorithms.reinforce_pp import discounted_returns, reinforce_pp_advantages


@dataclass(frozen=True)
class AdvantageParams:
    """Numeric settings of the estimators (mirrors fields of AlgorithmConfig)."""

    gamma: float = 1.0
    """Discount per token, in [0, 1]."""
    lam: float = 0.95
    """GAE lambda, in [0, 1]; used by "gae" only."""
    eps: float = 1e-6
    """> 0, added to stds in denominators ("grpo", "reinforce_pp*")."""
    normalize_std: bool = True
    """"grpo" divides by the group std (True) or only subtracts the mean (False, Dr. GRPO)."""


@dataclass(frozen=True)
class TokenAdvantages:
    """Output of the token stage."""

    advantages: Tensor
    """``[B, T]`` advantage per response token, 0 at padding."""
    returns: Tensor | None
    """``[B, T]`` critic targets A + V (estimators with a critic), else None."""


SequenceBaseline = Callable[[Tensor, "Tensor | None", AdvantageParams], Tensor]
TokenStage = Callable[[Tensor, Tensor, "Tensor | None", AdvantageParams], TokenAdvantages]


@dataclass(frozen=True)
class AdvantageEstimator:
    """One registered estimator."""

    sequence_baseline: SequenceBaseline
    """(rewards [B], group_index [B] | None, params) -> sequence scores [B]."""
    token_advantages: TokenStage
    """(token_rewards [B, T], response_mask [B, T], values [B, T] | None, params) -> advantages."""
    needs_critic: bool
    """True when ``values`` are required (and returns are produced)."""
    needs_groups: bool
    """True when ``group_index`` is required."""


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def _identity(rewards: Tensor, group_index: Tensor | None, params: AdvantageParams) -> Tensor:
    return rewards


def _require_groups(group_index: Tensor | None, estimator: str) -> Tensor:
    if group_index is None:
        raise BatchShapeError(f'advantage estimator "{estimator}" needs group_index; got None')
    return group_index


def _grpo_baseline(rewards: Tensor, group_index: Tensor | None, params: AdvantageParams) -> Tensor:
    group_index = _require_groups(group_index, "grpo")
    return grpo_advantages(rewards, group_index, normalize_std=params.normalize_std, eps=params.eps)


def _rloo_baseline(rewards: Tensor, group_index: Tensor | None, params: AdvantageParams) -> Tensor:
    return rloo_advantages(rewards, _require_groups(group_index, "rloo"))


def _group_mean_baseline(
    rewards: Tensor, group_index: Tensor | None, params: AdvantageParams
) -> Tensor:
    return group_moments(rewards, _require_groups(group_index, "reinforce_pp_baseline")).deviation


def _gae_tokens(
    token_rewards: Tensor, mask: Tensor, values: Tensor | None, params: AdvantageParams
) -> TokenAdvantages:
    if values is None:
        raise BatchShapeError('advantage estimator "gae" needs critic values; got None')
    advantages, returns = gae_advantages(token_rewards, values, mask, params.gamma, params.lam)
    return TokenAdvantages(advantages, returns)


def _returns_to_go_tokens(
    token_rewards: Tensor, mask: Tensor, values: Tensor | None, params: AdvantageParams
) -> TokenAdvantages:
    return TokenAdvantages(discounted_returns(token_rewards, mask, params.gamma), None)


def _whitened_returns_tokens(
    token_rewards: Tensor, mask: Tensor, values: Tensor | None, params: AdvantageParams
) -> TokenAdvantages:
    advantages = reinforce_pp_advantages(token_rewards, mask, gamma=params.gamma, eps=params.eps)
    return TokenAdvantages(advantages, None)


ADVANTAGE_ESTIMATORS.add("gae", AdvantageEstimator(_identity, _gae_tokens, True, False))
ADVANTAGE_ESTIMATORS.add(
    "grpo", AdvantageEstimator(_grpo_baseline, _returns_to_go_tokens, False, True)
)
ADVANTAGE_ESTIMATORS.add(
    "rloo", AdvantageEstimator(_rloo_baseline, _returns_to_go_tokens, False, True)
)
ADVANTAGE_ESTIMATORS.add(
    "reinforce_pp", AdvantageEstimator(_identity, _whitened_returns_tokens, False, False)
)
ADVANTAGE_ESTIMATORS.add(
    "reinforce_pp_baseline",
    AdvantageEstimator(_group_mean_baseline, _whitened_returns_tokens, False, True),
)


def advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as ``name`` (raises UnknownNameError listing the choices)."""
    return ADVANTAGE_ESTIMATORS.get(name)
