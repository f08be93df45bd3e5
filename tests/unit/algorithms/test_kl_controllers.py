"""Fixed and adaptive (Ziegler et al. 2019) KL coefficient controllers."""

from __future__ import annotations

import pytest

from megatron_rlhf.algorithms import (
    AdaptiveKLController,
    AlgorithmConfigError,
    FixedKLController,
    UnknownNameError,
    adaptive_kl_coefficient,
    build_kl_controller,
)

from . import references


def test_fixed_controller_never_changes() -> None:
    controller = FixedKLController(0.05)
    assert controller.update(current_kl=100.0, n_steps=512).value == 0.05


@pytest.mark.parametrize("kl_value", [0.0, 3.0, 5.9, 6.0, 6.5, 7.2, 50.0])
def test_adaptive_update_matches_reference(kl_value: float) -> None:
    expected = references.adaptive_kl(0.1, kl_value, 256, 6.0, 10000)
    assert adaptive_kl_coefficient(0.1, kl_value, 256, 6.0, 10000) == pytest.approx(
        expected, rel=1e-15
    )
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000).update(kl_value, 256)
    assert controller.value == pytest.approx(expected, rel=1e-15)


def test_adaptive_direction_and_twenty_percent_cap() -> None:
    controller = AdaptiveKLController(1.0, target=1.0, horizon=100)
    assert controller.update(10.0, 100).value == pytest.approx(1.2)
    assert controller.update(0.0, 100).value == pytest.approx(0.8)
    assert controller.update(1.0, 100).value == 1.0


def test_build_by_name() -> None:
    assert isinstance(build_kl_controller("fixed", 0.01), FixedKLController)
    adaptive = build_kl_controller("adaptive", 0.2, target=6.0, horizon=500)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.horizon == 500
    with pytest.raises(UnknownNameError, match="fixed, adaptive"):
        build_kl_controller("pid", 0.1)


def test_invalid_settings_raise_naming_the_value() -> None:
    with pytest.raises(AlgorithmConfigError, match="needs kl_target"):
        build_kl_controller("adaptive", 0.1)
    with pytest.raises(AlgorithmConfigError, match="horizon must be > 0; got 0"):
        AdaptiveKLController(0.1, 6.0, 0)
    with pytest.raises(AlgorithmConfigError, match="got -0.1"):
        FixedKLController(-0.1)
    with pytest.raises(ValueError, match="n_steps=500 is too large for horizon=100"):
        AdaptiveKLController(0.1, 6.0, 100).update(0.0, 500)
    with pytest.raises(ValueError, match="measured KL must be finite"):
        FixedKLController(0.1).update(float("nan"), 1)
