"""KL coefficient controllers: a fixed coefficient, or the adaptive one of Ziegler et al. 2019.

Adaptive controller (D. Ziegler et al., "Fine-Tuning Language Models from Human Preferences",
2019, Sec. 2.2): after each step with measured KL ``KL_t`` over ``n_steps`` samples,

    e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

so the coefficient grows when the policy drifts past the target and shrinks below it, by at most
20% per ``horizon`` samples. ``KL_t`` is the KL of whole responses: the mean over sequences of
the per-token k1 estimate summed over each response (``seq_mean_token_sum`` of
:func:`~megatron_rlhf.algorithms.kl.kl_estimate`), as in Ziegler et al.

Controllers are tiny immutable values: :meth:`update` returns a new controller and the current
coefficient is ``.value``. The caller keeps it (and checkpoints ``.value``). Built from config by
name (``"fixed"`` / ``"adaptive"``) with :func:`build_kl_controller`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from megatron_rlhf.algorithms.errors import AlgorithmConfigError
from megatron_rlhf.algorithms.registry import Registry

ADAPTIVE_KL_MAX_ERROR = 0.2
"""Clip of the proportional error e_t in Ziegler et al.'s controller."""


class KLController(Protocol):
    value: float
    """Current KL coefficient beta (>= 0)."""

    def update(self, current_kl: float, n_steps: int) -> KLController:
        """The controller after a step that measured ``current_kl`` over ``n_steps`` samples."""
        ...


@dataclass(frozen=True)
class FixedKLController:
    """A constant coefficient; :meth:`update` returns it unchanged."""

    value: float
    """The KL coefficient. >= 0."""

    def __post_init__(self) -> None:
        _check_coefficient(self.value)

    def update(self, current_kl: float, n_steps: int) -> FixedKLController:
        _check_step(current_kl, n_steps)
        return self


@dataclass(frozen=True)
class AdaptiveKLController:
    """Ziegler et al. 2019 proportional controller towards ``target`` KL."""

    value: float
    """Current coefficient beta (starts at the configured initial value). > 0."""
    target: float
    """Target KL per response, in nats. > 0."""
    horizon: int
    """Samples over which the coefficient may change by at most 20%. > 0."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value > 0):
            raise AlgorithmConfigError(f"adaptive KL coefficient must be > 0; got {self.value}")
        if not (math.isfinite(self.target) and self.target > 0):
            raise AlgorithmConfigError(f"adaptive KL target must be > 0; got {self.target}")
        if self.horizon <= 0:
            raise AlgorithmConfigError(f"adaptive KL horizon must be > 0; got {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> AdaptiveKLController:
        _check_step(current_kl, n_steps)
        if n_steps * ADAPTIVE_KL_MAX_ERROR >= self.horizon:
            raise ValueError(
                f"n_steps={n_steps} is too large for horizon={self.horizon}: one update could "
                f"scale the coefficient by 1 - {n_steps}/{self.horizon}*0.2 <= 0"
            )
        return replace(
            self,
            value=adaptive_kl_coefficient(
                self.value, current_kl, n_steps, self.target, self.horizon
            ),
        )


def adaptive_kl_coefficient(
    coef: float, current_kl: float, n_steps: int, target: float, horizon: int
) -> float:
    """``coef * (1 + n_steps / horizon * clip(current_kl / target - 1, -0.2, 0.2))``."""
    error = min(max(current_kl / target - 1.0, -ADAPTIVE_KL_MAX_ERROR), ADAPTIVE_KL_MAX_ERROR)
    return coef * (1.0 + n_steps / horizon * error)


def _check_coefficient(value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise AlgorithmConfigError(f"KL coefficient must be finite and >= 0; got {value}")


def _check_step(current_kl: float, n_steps: int) -> None:
    if not math.isfinite(current_kl):
        raise ValueError(f"measured KL must be finite; got {current_kl}")
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0; got {n_steps}")


KLControllerFactory = Callable[[float, "float | None", int], KLController]
KL_CONTROLLERS: Registry[KLControllerFactory] = Registry("KL controller")
KL_CONTROLLERS.add("fixed", lambda coef, target, horizon: FixedKLController(coef))


@KL_CONTROLLERS.register("adaptive")
def _adaptive(coef: float, target: float | None, horizon: int) -> AdaptiveKLController:
    if target is None:
        raise AlgorithmConfigError('KL controller "adaptive" needs kl_target; got None')
    return AdaptiveKLController(coef, target, horizon)


def build_kl_controller(
    name: str, coef: float, target: float | None = None, horizon: int = 10000
) -> KLController:
    """The controller named ``name`` (``"fixed"`` or ``"adaptive"``) starting at ``coef``."""
    return KL_CONTROLLERS.get(name)(coef, target, horizon)
