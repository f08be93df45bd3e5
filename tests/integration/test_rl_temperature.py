"""One temperature: at ``temperature: 0.7`` the trainer scores the sampled tokens as the engine sampled them.

``train-rl``'s loop (:func:`~megatron_rlhf.trainer.rl_loop.run_rl`, the code the command runs)
with GRPO, the reference (KL in the loss) and a colocated vLLM engine, at temperature 0.7. Both
the engine's sampling log-probs and the actor's log-probs come from the same weights (synced
before each rollout), so with one temperature the mean importance ratio of the sampled tokens is
1 up to fp32 noise and the weight-sync alarm stays silent; at step 0 the actor and the reference
hold the same weights, so their KL is 0. Before the fix the trainer computed log-probs at 1.0
while the engine sampled at 0.7 (issue 17: ratio off 1 by 0.016, an alarm at every step).
``run_rl`` joins the tier's session Ray (``ray_cluster``) instead of starting its own.
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

TEMPERATURE = 0.7


def test_train_rl_at_temperature_0_7_trainer_and_engine_logprobs_agree(tmp_path, ray_cluster, tiny_hf_model):
    from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl
    from megatron_rlhf.cli.train_rl import rl_config_from_mapping
    from megatron_rlhf.trainer.rl_loop import run_rl

    policy = tiny_hf_model("llama", seed=3, vocab_size=500)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?", "domain": "math", "ground_truth": str(i + 2)})
                               + "\n" for i in range(4)))
    config = rl_config_from_mapping({
        "policy_dir": str(policy), "out_dir": str(tmp_path / "out"), "prompt_files": [str(prompts)],
        "preset": "grpo", "temperature": TEMPERATURE, "steps": 2, "prompts_per_step": 2, "n": 4,
        "max_new_tokens": 8, "actor_optimizer": {"lr": 1.0e-3}, "checkpoint_every": 0, "sync_alarm_action": "stop",
        "tensorboard": False, "console": False,
    }, "test")
    result = run_rl(config)  # sync_alarm_action: stop raises on an alarm

    rows = read_metrics_jsonl(result.metrics_file)
    assert [row["step"] for row in rows] == [0, 1]
    assert rows[0]["time/to_first_step"] > rows[0]["time/step"]  # start-up included; logged once
    assert "time/to_first_step" not in rows[1]
    for row in rows:
        assert abs(row["ratio/engine_mean"] - 1.0) < 1e-3, row
        assert row["ratio/engine_max_abs_logprob_diff"] <= config.sync_alarm_logprob_diff, row
        assert row["ratio/sync_alarms"] == 0, row
    assert math.isclose(rows[0]["kl/mean"], 0.0, abs_tol=1e-6), rows[0]
