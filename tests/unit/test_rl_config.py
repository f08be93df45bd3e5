"""RL run configuration, YAML loading, the weight-sync alarm and the step's pure helpers."""

from __future__ import annotations

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
    from megatron_rlhf.trainer.ppo_update import PPOUpdateConfig

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
