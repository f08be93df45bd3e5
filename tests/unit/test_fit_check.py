"""Trainers refuse a layout that does not fit before they start anything, unless overridden.

The RL, reward-model and SFT entry points call the planner first; a Qwen2.5-32B actor at TP8 on
one H100 node does not fit (fp32 gradients and Adam state of 4.1B parameters per GPU plus 8K-token
activations), so each raises :class:`DoesNotFit` naming the phase and component (the CLI turns it
into exit 2 in seconds); ``fit_check.allow_unfit`` turns the refusal into a warning."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.planning.fit_check import (
    DoesNotFit,
    FitCheckConfig,
    check_rl_config_fits,
    check_rm_config_fits,
    check_sft_config_fits,
)

ROOT = Path(__file__).resolve().parents[2]
TP8 = ParallelConfig(tensor_parallel=8, sequence_parallel=True)


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def _rl_config(**fit):
    from megatron_rlhf.config.recipe import load_recipe
    from megatron_rlhf.cli.train_rl import rl_config_from_mapping

    recipe = "examples/qwen2.5-32b/grpo-h100-minimum.yaml"
    config = rl_config_from_mapping(load_recipe(recipe), recipe)
    from megatron_rlhf.trainer.rl_config import WorkerGroupConfig

    return dataclasses.replace(config, actor=WorkerGroupConfig(world_size=8, parallel=TP8),
                               fit_check=dataclasses.replace(config.fit_check, **fit))


def test_rl_refuses_unfit_layout(in_repo):
    with pytest.raises(DoesNotFit, match=r"actor group: the layout does not fit: phase \w+ .*largest component"):
        check_rl_config_fits(_rl_config())


def test_rl_override_warns_and_goes_on(in_repo, caplog):
    with caplog.at_level(logging.WARNING):
        plans = check_rl_config_fits(_rl_config(allow_unfit=True))
    assert not plans[0].fits and "allow_unfit is set" in caplog.text


def test_rl_fit_check_can_be_disabled(in_repo):
    assert check_rl_config_fits(_rl_config(enabled=False)) == []


def test_reward_model_refuses_unfit_layout(in_repo):
    from megatron_rlhf.trainer.reward_model_run import load_train_rm_config

    config = dataclasses.replace(load_train_rm_config("examples/qwen2.5-32b/orm-h100-minimum.yaml"),
                                 parallel=TP8, data_parallel=1)
    with pytest.raises(DoesNotFit, match="train-rm"):
        check_rm_config_fits(config, 8)


def test_sft_refuses_unfit_layout_unless_overridden():
    sft = SimpleNamespace(max_length=8192, micro_batch_size=1, global_batch_size=8)

    def config(**fit):
        return SimpleNamespace(hf_dir=str(ROOT / "examples" / "qwen2.5-32b"), precision=None,
                               resources=None, fit_check=FitCheckConfig(gpu="h100", **fit))

    with pytest.raises(DoesNotFit, match="train-sft"):
        check_sft_config_fits(config(), TP8, 8, sft, "bfloat16", 32768)
    assert not check_sft_config_fits(config(allow_unfit=True), TP8, 8, sft, "bfloat16", 32768).fits


def test_train_rl_exits_2_before_starting_anything(tmp_path, capsys, in_repo):
    from megatron_rlhf.cli import main

    recipe = tmp_path / "unfit.yaml"
    recipe.write_text(f"base: {ROOT / 'examples' / 'qwen2.5-32b' / 'grpo-h100-minimum.yaml'}\n"
                      f"out_dir: {tmp_path / 'run'}\n"
                      "actor: {world_size: 8, parallel: {tensor_parallel: 8, pipeline_parallel: 1}}\n")
    assert main(["train-rl", "--config", str(recipe)]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
