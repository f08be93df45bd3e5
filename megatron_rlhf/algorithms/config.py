"""Typed configuration of the RL algorithm: advantage estimator, reward shaping, KL, PPO losses.

Library code receives an :class:`AlgorithmConfig` explicitly; only entry points build it from
YAML/argv. Every field is checked at construction by the small validators at the bottom of this
file; a bad value raises :class:`~megatron_rlhf.algorithms.errors.AlgorithmConfigError` (or
:class:`~megatron_rlhf.algorithms.errors.UnknownNameError` for an unregistered name) naming the
field and the value.

Defaults are PPO with GAE as in "Does RLHF Scale?" (Hou et al. 2024): no reward clipping or
normalisation unless asked, a per-token k1 KL penalty with a fixed coefficient, PPO clip 0.2,
value clip 0.2, token-mean loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rlhf.algorithms.advantages import ADVANTAGE_ESTIMATORS
from megatron_rlhf.algorithms.errors import AlgorithmConfigError
from megatron_rlhf.algorithms.kl import KL_ESTIMATORS
from megatron_rlhf.algorithms.kl_controllers import KL_CONTROLLERS
from megatron_rlhf.algorithms.policy_loss import check_clip_settings
from megatron_rlhf.algorithms.reductions import REDUCTIONS
from megatron_rlhf.algorithms.registry import Registry
from megatron_rlhf.algorithms.reward_shaping import REWARD_NORMALIZATIONS
from megatron_rlhf.algorithms.rollout_correction import check_rollout_is

KL_MODES = ("penalty", "loss", "none")


@dataclass(frozen=True)
class AlgorithmConfig:
    advantage_estimator: str = "gae"
    """Advantage estimator: "gae" (PPO with critic), "grpo", "rloo", "reinforce_pp" or
    "reinforce_pp_baseline" (see :mod:`.advantages`)."""

    gamma: float = 1.0
    """Per-token discount of rewards, in [0, 1]. 1 is the RLHF norm (one reward per response)."""

    gae_lambda: float = 0.95
    """GAE lambda, in [0, 1]; used by "gae" only. 1 = Monte-Carlo returns minus V."""

    advantage_eps: float = 1e-6
    """> 0. Added to the std in GRPO's and REINFORCE++'s advantage normalisation."""

    grpo_normalize_std: bool = True
    """"grpo": divide by the group std (True, GRPO) or only subtract the mean (False, Dr. GRPO)."""

    reward_clip: tuple[float, float] | None = None
    """(low, high) clamp of the raw sequence reward, finite with low < high; None = no clip.
    First shaping step ("Does RLHF Scale?" Sec. 3)."""

    reward_normalization: str = "none"
    """"none", "group" (over the responses of each prompt), "batch" or "domain" (running
    per-domain moments). ``(r - mean) / (std + eps)``, unbiased std. Second shaping step."""

    reward_norm_eps: float = 1e-6
    """> 0. Added to the std in reward normalisation."""

    reward_shrink_alpha: float = 1.0
    """Asymmetric reward shrinking ("Does RLHF Scale?" Sec. 3.2): negative rewards are multiplied
    by alpha, non-negative ones pass. In (0, 1]; 1 disables it. Critic-free estimators only."""

    kl_estimator: str = "k1"
    """Per-token KL(pi || pi_ref) estimator: "k1", "k2" or "k3" (Schulman 2020)."""

    kl_mode: str = "penalty"
    """"penalty" (``-coef * kl`` added to token rewards), "loss" (``coef * kl`` added to the actor
    loss) or "none" (no KL; no reference model needed)."""

    kl_controller: str = "fixed"
    """"fixed" or "adaptive" (Ziegler et al. 2019) KL coefficient."""

    kl_coef: float = 0.01
    """KL coefficient (initial value for "adaptive"). Finite, >= 0 (> 0 for "adaptive")."""

    kl_target: float | None = None
    """"adaptive" only: target KL per response, in nats; > 0. Required for "adaptive"."""

    kl_horizon: int = 10000
    """"adaptive" only: samples over which the coefficient changes by at most 20%. > 0."""

    ppo_clip_low: float = 0.2
    """Ratio clipped below at 1 - ppo_clip_low. In [0, 1)."""

    ppo_clip_high: float = 0.2
    """Ratio clipped above at 1 + ppo_clip_high. >= 0 (DAPO's clip-higher uses e.g. 0.28)."""

    dual_clip: float | None = None
    """Dual-clip constant c > 1 (Ye et al. 2020) bounding the loss of negative-advantage tokens
    at -c * A; None disables it."""

    value_clip: float | None = 0.2
    """"gae" only: critic predictions clipped to old value +- value_clip in the value loss; > 0,
    or None for an unclipped loss. In the reward's units."""

    entropy_coef: float = 0.0
    """Weight of the entropy bonus (loss term ``-entropy_coef * entropy``). Finite, >= 0."""

    loss_reduction: str = "token_mean"
    """Reduction of per-token losses: "token_mean", "seq_mean_token_sum" or
    "seq_mean_token_mean" (see :mod:`.reductions`)."""

    rollout_is: str = "none"
    """Truncated importance sampling of the policy loss against the rollout engine's sampling
    policy (:mod:`.rollout_correction`): "none", "token" (one weight per token) or "sequence"
    (one weight per response, the product of its token ratios). Corrects the engine/trainer
    mismatch: a one-step-off-policy engine's older weights, an FP8 or bf16 engine's precision."""

    rollout_is_threshold: float = 2.0
    """Truncation ``C`` of the importance weights (``min(w, C)``); finite, > 0. Used unless
    rollout_is is "none"."""

    def __post_init__(self) -> None:
        for validate in _VALIDATORS:
            validate(self)

    @property
    def needs_critic(self) -> bool:
        """Whether the estimator needs critic values (and produces returns)."""
        return ADVANTAGE_ESTIMATORS.get(self.advantage_estimator).needs_critic


def _check_registered(field: str, value: str, registry: Registry) -> None:
    if value not in registry:
        raise AlgorithmConfigError(
            f"{field}={value!r} is not a registered {registry.kind}; choose one of: "
            f"{', '.join(registry.names())}"
        )


def _check_names(config: AlgorithmConfig) -> None:
    _check_registered("advantage_estimator", config.advantage_estimator, ADVANTAGE_ESTIMATORS)
    _check_registered("reward_normalization", config.reward_normalization, REWARD_NORMALIZATIONS)
    _check_registered("kl_estimator", config.kl_estimator, KL_ESTIMATORS)
    _check_registered("kl_controller", config.kl_controller, KL_CONTROLLERS)
    _check_registered("loss_reduction", config.loss_reduction, REDUCTIONS)
    if config.kl_mode not in KL_MODES:
        raise AlgorithmConfigError(
            f"kl_mode={config.kl_mode!r}; choose one of: {', '.join(KL_MODES)}"
        )


def _check_discounts(config: AlgorithmConfig) -> None:
    for field in ("gamma", "gae_lambda"):
        value = getattr(config, field)
        if not 0.0 <= value <= 1.0:
            raise AlgorithmConfigError(f"{field} must be in [0, 1]; got {value}")


def _check_epsilons(config: AlgorithmConfig) -> None:
    for field in ("advantage_eps", "reward_norm_eps"):
        value = getattr(config, field)
        if not (math.isfinite(value) and value > 0):
            raise AlgorithmConfigError(f"{field} must be finite and > 0; got {value}")


def _check_reward_clip(config: AlgorithmConfig) -> None:
    if config.reward_clip is None:
        return
    if len(config.reward_clip) != 2:
        raise AlgorithmConfigError(f"reward_clip must be (low, high); got {config.reward_clip}")
    low, high = config.reward_clip
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise AlgorithmConfigError(
            f"reward_clip must be finite with low < high; got {config.reward_clip}"
        )


def _check_shrink(config: AlgorithmConfig) -> None:
    alpha = config.reward_shrink_alpha
    if not 0.0 < alpha <= 1.0:
        raise AlgorithmConfigError(f"reward_shrink_alpha must be in (0, 1]; got {alpha}")
    if alpha < 1.0 and config.needs_critic:
        raise AlgorithmConfigError(
            f"reward_shrink_alpha={alpha} is for critic-free estimators ('Does RLHF Scale?' "
            f"Sec. 3.2); advantage_estimator={config.advantage_estimator!r} uses a critic"
        )


def _check_kl(config: AlgorithmConfig) -> None:
    if not (math.isfinite(config.kl_coef) and config.kl_coef >= 0):
        raise AlgorithmConfigError(f"kl_coef must be finite and >= 0; got {config.kl_coef}")
    if config.kl_controller != "adaptive":
        return
    if config.kl_coef <= 0:
        raise AlgorithmConfigError(
            f'kl_controller "adaptive" needs kl_coef > 0; got {config.kl_coef}'
        )
    if config.kl_target is None or not (math.isfinite(config.kl_target) and config.kl_target > 0):
        raise AlgorithmConfigError(
            f'kl_controller "adaptive" needs a finite kl_target > 0; got {config.kl_target}'
        )
    if config.kl_horizon <= 0:
        raise AlgorithmConfigError(f"kl_horizon must be > 0; got {config.kl_horizon}")


def _check_losses(config: AlgorithmConfig) -> None:
    check_clip_settings(config.ppo_clip_low, config.ppo_clip_high, config.dual_clip)
    if config.value_clip is not None and not config.value_clip > 0:
        raise AlgorithmConfigError(f"value_clip must be > 0 or None; got {config.value_clip}")
    if not (math.isfinite(config.entropy_coef) and config.entropy_coef >= 0):
        raise AlgorithmConfigError(
            f"entropy_coef must be finite and >= 0; got {config.entropy_coef}"
        )
    check_rollout_is(config.rollout_is, config.rollout_is_threshold)


_VALIDATORS = (
    _check_names,
    _check_discounts,
    _check_epsilons,
    _check_reward_clip,
    _check_shrink,
    _check_kl,
    _check_losses,
)
