"""AlgorithmConfig validation: every bad value raises an error naming the field and the value."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_rlhf.algorithms import AlgorithmConfig, AlgorithmConfigError


def test_defaults_are_valid_ppo_with_critic() -> None:
    config = AlgorithmConfig()
    assert config.advantage_estimator == "gae" and config.needs_critic


def test_every_field_has_a_docstring() -> None:
    import inspect

    import megatron_rlhf.algorithms.config as module

    source = inspect.getsource(module.AlgorithmConfig)
    for field in dataclasses.fields(AlgorithmConfig):
        declaration = source.index(f"    {field.name}:")
        assert '"""' in source[declaration : declaration + 400].split("\n", 2)[1], field.name


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"advantage_estimator": "ppo"},
            (
                "advantage_estimator='ppo' is not a registered advantage estimator; "
                "choose one of: gae, grpo"
            ),
        ),
        (
            {"reward_normalization": "zscore"},
            "reward_normalization='zscore'.*none, group, batch, domain",
        ),
        ({"kl_estimator": "k4"}, "kl_estimator='k4'"),
        ({"kl_controller": "pid"}, "kl_controller='pid'"),
        (
            {"loss_reduction": "mean"},
            "loss_reduction='mean'.*token_mean, seq_mean_token_sum, seq_mean_token_mean",
        ),
        ({"kl_mode": "reward"}, "kl_mode='reward'; choose one of: penalty, loss, none"),
        ({"gamma": 1.01}, "gamma must be in \\[0, 1\\]; got 1.01"),
        ({"gae_lambda": -0.5}, "gae_lambda must be in \\[0, 1\\]; got -0.5"),
        ({"advantage_eps": 0.0}, "advantage_eps must be finite and > 0; got 0.0"),
        ({"reward_norm_eps": float("nan")}, "reward_norm_eps must be finite and > 0; got nan"),
        (
            {"reward_clip": (5.0, -5.0)},
            "reward_clip must be finite with low < high; got \\(5.0, -5.0\\)",
        ),
        (
            {"advantage_estimator": "grpo", "reward_shrink_alpha": 0.0},
            "reward_shrink_alpha must be in \\(0, 1\\]; got 0.0",
        ),
        (
            {"reward_shrink_alpha": 0.5},
            "reward_shrink_alpha=0.5 is for critic-free estimators.*'gae'",
        ),
        ({"kl_coef": -0.1}, "kl_coef must be finite and >= 0; got -0.1"),
        ({"kl_controller": "adaptive"}, "needs a finite kl_target > 0; got None"),
        (
            {"kl_controller": "adaptive", "kl_target": 6.0, "kl_horizon": 0},
            "kl_horizon must be > 0; got 0",
        ),
        ({"ppo_clip_low": 1.0}, "ppo_clip_low"),
        ({"dual_clip": 0.9}, "dual clip constant must be > 1 \\(or None\\); got 0.9"),
        ({"value_clip": -1.0}, "value_clip must be > 0 or None; got -1.0"),
        ({"entropy_coef": -0.01}, "entropy_coef must be finite and >= 0; got -0.01"),
    ],
)
def test_invalid_values_raise_naming_field_and_value(overrides: dict, message: str) -> None:
    with pytest.raises(AlgorithmConfigError, match=message):
        AlgorithmConfig(**overrides)


def test_critic_free_configs_with_shrinking_are_valid() -> None:
    for estimator in ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        config = AlgorithmConfig(advantage_estimator=estimator, reward_shrink_alpha=0.5)
        assert not config.needs_critic
