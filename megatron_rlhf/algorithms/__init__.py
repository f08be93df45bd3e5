"""RL algorithms for RLHF: pure tensor functions, selectable by name from :class:`AlgorithmConfig`.

Conventions (every module): token-level tensors are ``[B, T]`` over response tokens, right-padded,
with ``response_mask`` ``[B, T]`` (1 = response token); sequence-level tensors are ``[B]``; prompt
groups are ``group_index`` ``[B]`` int64 (see :mod:`.groups`). Stds are unbiased (n - 1); a
single-sample or constant group has deviation and advantage exactly 0. Reductions of an empty
mask are 0. Padding may hold anything (NaN, -inf): it is replaced by 0 before any arithmetic.
NaN/Inf at response tokens raise :class:`NonFiniteError` naming the tensor.

File map (one concern per file):

============================  ===============================================================
``config.py``                 :class:`AlgorithmConfig`, its validators
``experience.py``             :class:`Rollout` (input) and :class:`Experience` (what losses eat)
``make_experience.py``        shaping -> KL penalty -> advantages, in the paper's order
``reward_shaping.py``         clip, group/batch normalisation, asymmetric shrink; registry
``domain_normalization.py``   running per-domain reward normalisation
``groups.py``                 per-prompt-group moments, contiguous group ids
``advantages.py``             advantage-estimator registry (two stages per estimator)
``gae.py``                    GAE for PPO with a critic
``group_advantages.py``       GRPO and RLOO sequence advantages
``reinforce_pp.py``           REINFORCE++ batch-whitened returns-to-go
``kl.py``                     k1/k2/k3 estimators, KL penalty, KL loss
``kl_controllers.py``         fixed and adaptive (Ziegler et al. 2019) KL coefficients
``policy_loss.py``            PPO clipped surrogate (low/high clip, dual clip) + metrics
``value_loss.py``             clipped value loss
``rollout_correction.py``     truncated importance weights (token / sequence) vs the engine
``entropy.py``                entropy bonus
``objectives.py``             actor / critic loss assembled from the config
``reductions.py``             token_mean / seq_mean_token_sum / seq_mean_token_mean
``masks.py``                  response-mask validation and layout helpers
``finite.py``                 non-finite guards naming the tensor
``registry.py``, ``errors.py``  name -> implementation tables; exception types
============================  ===============================================================
"""

from megatron_rlhf.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    AdvantageParams,
    advantage_estimator,
)
from megatron_rlhf.algorithms.config import AlgorithmConfig
from megatron_rlhf.algorithms.domain_normalization import (
    DomainRewardStats,
    RunningMoments,
    normalize_by_domain,
)
from megatron_rlhf.algorithms.entropy import entropy_bonus_loss
from megatron_rlhf.algorithms.errors import (
    AlgorithmConfigError,
    BatchShapeError,
    NonFiniteError,
    UnknownNameError,
)
from megatron_rlhf.algorithms.experience import Experience, Rollout
from megatron_rlhf.algorithms.finite import check_all_finite, check_finite
from megatron_rlhf.algorithms.gae import gae_advantages
from megatron_rlhf.algorithms.group_advantages import grpo_advantages, rloo_advantages
from megatron_rlhf.algorithms.groups import GroupMoments, contiguous_group_index, group_moments
from megatron_rlhf.algorithms.kl import (
    KL_ESTIMATORS,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss,
    kl_penalty_rewards,
)
from megatron_rlhf.algorithms.kl_controllers import (
    KL_CONTROLLERS,
    AdaptiveKLController,
    FixedKLController,
    adaptive_kl_coefficient,
    build_kl_controller,
)
from megatron_rlhf.algorithms.make_experience import make_experience
from megatron_rlhf.algorithms.masks import (
    broadcast_to_tokens,
    check_response_mask,
    place_at_last_token,
)
from megatron_rlhf.algorithms.objectives import ActorLossOutput, actor_loss, critic_loss
from megatron_rlhf.algorithms.policy_loss import (
    PolicyLossMetrics,
    PolicyLossOutput,
    ppo_policy_loss,
)
from megatron_rlhf.algorithms.rollout_correction import (
    ROLLOUT_IS_LEVELS,
    RolloutCorrectionStats,
    rollout_correction_stats,
    truncated_is_weights,
)
from megatron_rlhf.algorithms.reductions import (
    REDUCTIONS,
    ReductionParts,
    masked_reduce,
    reduction_parts,
    seq_mean_token_mean,
    seq_mean_token_sum,
    token_mean,
)
from megatron_rlhf.algorithms.reinforce_pp import (
    discounted_returns,
    reinforce_pp_advantages,
    whiten_over_tokens,
)
from megatron_rlhf.algorithms.reward_shaping import (
    REWARD_NORMALIZATIONS,
    asymmetric_shrink,
    clip_rewards,
    normalize_in_batch,
    normalize_in_groups,
    normalize_rewards,
)
from megatron_rlhf.algorithms.value_loss import ValueLossOutput, clipped_value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "REDUCTIONS",
    "REWARD_NORMALIZATIONS",
    "ActorLossOutput",
    "AdaptiveKLController",
    "AdvantageEstimator",
    "AdvantageParams",
    "AlgorithmConfig",
    "AlgorithmConfigError",
    "BatchShapeError",
    "DomainRewardStats",
    "Experience",
    "FixedKLController",
    "GroupMoments",
    "NonFiniteError",
    "PolicyLossMetrics",
    "PolicyLossOutput",
    "ROLLOUT_IS_LEVELS",
    "RolloutCorrectionStats",
    "ReductionParts",
    "Rollout",
    "RunningMoments",
    "UnknownNameError",
    "ValueLossOutput",
    "actor_loss",
    "adaptive_kl_coefficient",
    "advantage_estimator",
    "asymmetric_shrink",
    "broadcast_to_tokens",
    "build_kl_controller",
    "check_all_finite",
    "check_finite",
    "check_response_mask",
    "clip_rewards",
    "clipped_value_loss",
    "contiguous_group_index",
    "critic_loss",
    "discounted_returns",
    "entropy_bonus_loss",
    "gae_advantages",
    "group_moments",
    "grpo_advantages",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "kl_penalty_rewards",
    "make_experience",
    "masked_reduce",
    "normalize_by_domain",
    "normalize_in_batch",
    "normalize_in_groups",
    "normalize_rewards",
    "place_at_last_token",
    "ppo_policy_loss",
    "rollout_correction_stats",
    "truncated_is_weights",
    "reduction_parts",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "token_mean",
    "whiten_over_tokens",
]
