"""RL run configuration, YAML loading (typed reward, curriculum, sampling and placement records,
read once), the weight-sync alarm and the step's pure helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rlhf.rewards.sample import RewardResult, RewardStatus, Verdict
from megatron_rlhf.cli.train_rl import load_rl_config
from megatron_rlhf.trainer.rl_config import RLConfig
from megatron_rlhf.trainer.rl_loop import sync_alarm
from megatron_rlhf.trainer.rl_step import domain_index, rewards_tensor


def _config(**overrides) -> RLConfig:
    return RLConfig(policy_dir="p", out_dir="o", prompt_files=("x.jsonl",), **overrides)


def test_presets_and_yaml(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text("policy_dir: p\nout_dir: o\nprompt_files: [a.jsonl]\npreset: ppo\n"
                    "algorithm: {kl_coef: 0.02}\nactor: {world_size: 2, parallel: {tensor_parallel: 2}}\n")
    config = load_rl_config(path)
    assert config.algorithm.advantage_estimator == "gae" and config.algorithm.kl_coef == 0.02
    assert config.actor.parallel.tensor_parallel == 2 and config.prompt_files == ("a.jsonl",)
    assert load_rl_config(path, algo="grpo").algorithm.advantage_estimator == "grpo"


@pytest.mark.parametrize("text, message", [
    ("policy_dir: p\nout_dir: o\nprompt_files: [a]\nstepz: 3\n", "unknown key(s) ['stepz']"),
    ("policy_dir: p\nout_dir: o\nprompt_files: [a]\npreset: dpo\n", "'dpo'"),
    ("policy_dir: p\nout_dir: o\nprompt_files: [a]\nn: 0\n", "RLConfig.n=0"),
    ("policy_dir: p\nout_dir: o\nprompt_files: [a]\nalgorithm: {kl_cof: 1}\n", "algorithm"),
])
def test_yaml_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "rl.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="rl.yaml") as error:
        load_rl_config(path)
    assert message in str(error.value)


def test_batch_must_split_into_minibatches():
    from megatron_rlhf.training.ppo_update import PPOUpdateConfig

    with pytest.raises(ValueError, match="num_minibatches=3"):
        _config(prompts_per_step=2, n=4, update=PPOUpdateConfig(num_minibatches=3))


def test_sync_alarm_threshold():
    config = _config(sync_alarm_logprob_diff=0.05)
    assert sync_alarm(config, {"ratio/engine_max_abs_logprob_diff": 0.01}) is None
    message = sync_alarm(config, {"ratio/engine_max_abs_logprob_diff": 0.3, "ratio/engine_mean": 0.9})
    assert "0.3" in message and "0.9000" in message
    assert sync_alarm(_config(sync_alarm_logprob_diff=None), {"ratio/engine_max_abs_logprob_diff": 9.0}) is None
    with pytest.raises(ValueError, match="sync_alarm_action"):
        _config(sync_alarm_action="ignore")


def test_infra_errors_get_their_group_mean_and_are_masked():
    ok = lambda reward: RewardResult(reward, RewardStatus.SCORED, Verdict.OK)  # noqa: E731
    error = RewardResult(None, RewardStatus.INFRA_ERROR, Verdict.SCORER_ERROR)
    rewards, valid = rewards_tensor([ok(1.0), error, ok(0.0), error, error], torch.tensor([0, 0, 0, 1, 1]))
    assert valid.tolist() == [True, False, True, False, False]
    assert rewards.tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]


def test_domain_ids_are_stable_across_steps():
    ids, table = domain_index(["math", "code", "math"], [])
    assert ids.tolist() == [0, 1, 0] and table == ["math", "code"]
    ids, table = domain_index(["general", "math"], table)
    assert ids.tolist() == [2, 0] and table == ["math", "code", "general"]


# --- typed records, read once when the run YAML is loaded ------------------------------------------


def _run_yaml(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "rl.yaml"
    path.write_text("policy_dir: p\nout_dir: o\nprompt_files: [a.jsonl]\nn: 3\ntemperature: 0.7\n"
                    "max_new_tokens: 16\nseed: 5\n" + extra)
    return path


def test_yaml_gives_typed_reward_curriculum_sampling_and_placement_records(tmp_path):
    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.data.curriculum import CurriculumConfig
    from megatron_rlhf.rewards.reward_config import RewardConfig

    rewards = tmp_path / "rewards.yaml"
    rewards.write_text("sources: {m: {kind: math_verifier, time_limit_seconds: 3}}\n"
                       "domains: {math: {sources: {m: 1.0}}}\n")
    config = load_rl_config(_run_yaml(tmp_path, f"reward_config: {rewards}\nplacement: disaggregated\n"
                                                "curriculum: {first_domains: [math], until_step: 4}\n"))
    assert isinstance(config.reward_config, RewardConfig) and config.reward_config.origin == str(rewards)
    assert config.reward_config.sources["m"].config.time_limit_seconds == 3
    assert list(config.reward_config.router.domains) == ["math"]
    assert config.curriculum == CurriculumConfig.first_then_all(("math",), 4)
    assert config.sampling == SamplingSettings(n=3, temperature=0.7, max_new_tokens=16, seed=5)
    assert config.placement == "disaggregated"


def test_yaml_without_reward_config_gets_the_default_verifiers(tmp_path):
    from megatron_rlhf.rewards.reward_config import default_reward_config

    config = load_rl_config(_run_yaml(tmp_path, "reward_config: null\n"))
    assert config.reward_config == default_reward_config() and config.reward_config.origin is None
    assert config.curriculum is None


def test_the_reward_yaml_is_read_once_at_load_time(tmp_path):
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text("sources: {m: {kind: math_verifier}}\ndomains: {math: {sources: {m: 1.0}}}\n")
    config = load_rl_config(_run_yaml(tmp_path, f"reward_config: {rewards}\n"))
    rewards.write_text("not: [a reward config")  # what later stages see is the record, not the file
    assert list(config.reward_config.router.domains) == ["math"]


@pytest.mark.parametrize("extra, message", [
    ("curriculum: {phases: [{until_step: later}]}\n",
     "rl.yaml: curriculum.phases[0].until_step: expected an integer or null, got 'later'"),
    ("curriculum: {phases: [{until_step: 3, domain_weights: {math: lots}}]}\n",
     "rl.yaml: curriculum.phases[0].domain_weights.math: expected a number, got 'lots'"),
    ("curriculum: {first_domains: math, until_step: 3}\n", "rl.yaml: curriculum.first_domains: expected a list"),
    ("curriculum: {phases: [{until_step: 5}, {until_step: 2}]}\n", "rl.yaml: curriculum: curriculum phase 1"),
    ("reward_config: {sources: {}}\n", "rl.yaml: reward_config: expected the path of a reward YAML file"),
    ("placement: remote\n", "rl.yaml: placement: expected one of ['colocated', 'disaggregated'], got 'remote'"),
])
def test_curriculum_and_reward_errors_name_the_file_and_key_path(tmp_path, extra, message):
    from megatron_rlhf.config.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        load_rl_config(_run_yaml(tmp_path, extra))
    assert message in str(error.value)


def test_reward_yaml_errors_name_the_reward_file_and_key_path(tmp_path):
    from megatron_rlhf.config.errors import ConfigError, MissingInput

    rewards = tmp_path / "rewards.yaml"
    rewards.write_text("sources: {m: {kind: math_verifier, time_limit_seconds: soon}}\n"
                       "domains: {math: {sources: {m: 1.0}}}\n")
    with pytest.raises(ConfigError, match="expected a number, got 'soon'") as error:
        load_rl_config(_run_yaml(tmp_path, f"reward_config: {rewards}\n"))
    assert str(error.value).startswith(f"{rewards}: sources.m.time_limit_seconds:")
    with pytest.raises(MissingInput) as missing:
        load_rl_config(_run_yaml(tmp_path, f"reward_config: {tmp_path / 'nope.yaml'}\n"))
    assert str(missing.value).startswith(f"{tmp_path / 'rl.yaml'}: reward_config: reward config")


def test_loading_a_bad_reward_yaml_fails_before_ray_or_vllm_is_imported(tmp_path):
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text("sources: {m: {kind: math_verifyer}}\ndomains: {math: {sources: {m: 1.0}}}\n")
    run = _run_yaml(tmp_path, f"reward_config: {rewards}\n")
    probe = ("import sys\nfrom megatron_rlhf.config.errors import ConfigError\n"
             "from megatron_rlhf.cli.train_rl import load_rl_config\n"
             f"try:\n    load_rl_config({str(run)!r})\nexcept ConfigError as error:\n    print('ERROR=' + str(error))\n"
             "print('LOADED=' + ','.join(m for m in ('ray', 'vllm') if m in sys.modules))\n")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert f"ERROR={rewards}: sources.m.kind: unknown reward source kind 'math_verifyer'" in result.stdout, result.stderr
    assert "LOADED=\n" in result.stdout


def test_configs_built_in_code_take_records_not_paths():
    with pytest.raises(TypeError, match="load_reward_config"):
        _config(reward_config="rewards.yaml")
    with pytest.raises(TypeError, match="CurriculumConfig.from_mapping"):
        _config(curriculum={"first_domains": ["math"], "until_step": 3})
