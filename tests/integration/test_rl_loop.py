"""The RL loop end to end on Ray with real vLLM, Megatron workers and the verifier reward.

- PPO (with critic) and GRPO each run steps with n in {1, 2, 4, 8} responses per prompt, with
  the actor at TP2 (two Ray actors, one gloo world), the reference and critic at TP1, and the
  engine colocated in the actor's rank 0; every step returns finite metrics, syncs weights
  (the engine's log-probs equal the trainer's for the sampled tokens before the update) and the
  metrics the issue asks for are present. GRPO (one epoch, one minibatch, KL loss) skips the
  old-policy pass and takes its metrics from the update's forward; PPO (KL penalty) keeps it.
- A prompt file with malformed lines, empty prompts and over-long prompts: each reported with
  file and line, and the run proceeds on the valid ones.
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

VOCAB = 500


def _write_prompts(path, count: int) -> None:
    with open(path, "w") as handle:
        for index in range(count):
            handle.write(json.dumps({"id": f"m{index}", "prompt": f"What is {index} + 2?", "domain": "math",
                                     "ground_truth": str(index + 2)}) + "\n")


@pytest.fixture(scope="module")
def policy_dir(tiny_hf_model):
    return tiny_hf_model("llama", seed=3, vocab_size=VOCAB)


def test_bad_prompt_lines_are_reported_and_skipped(policy_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    from megatron_rlhf.trainer.rl_config import RLConfig
    from megatron_rlhf.trainer.rl_loop import make_sampler

    path = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"prompt": "What is 1 + 2?", "domain": "math", "ground_truth": "3"}),
        "{not json",
        json.dumps({"prompt": "   ", "domain": "math", "ground_truth": "1"}),
        json.dumps({"prompt": "seven " * 400, "domain": "math", "ground_truth": "7"}),
        json.dumps({"prompt": "What is 2 + 2?", "domain": "math", "ground_truth": "4"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    config = RLConfig(policy_dir=policy_dir, out_dir=str(tmp_path / "out"), prompt_files=(str(path),),
                      prompts_per_step=2, n=1, max_prompt_tokens=64)
    with caplog.at_level("INFO"):
        sampler = make_sampler(config, AutoTokenizer.from_pretrained(policy_dir))
    batch = sampler.next_batch()
    assert sorted(record.text for record in batch) == ["What is 1 + 2?", "What is 2 + 2?"]
    text = caplog.text
    assert f"{path}:2" in text and f"{path}:3" in text and f"{path}:4" in text


def test_ppo_and_grpo_with_n_1_2_4_8_and_a_tp2_actor(policy_dir, tmp_path, ray_cluster):
    from transformers import AutoTokenizer

    from megatron_rlhf.algorithms import DomainRewardStats, build_kl_controller
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.data.prompts import load_prompt_dataset
    from megatron_rlhf.trainer.rl_config import RLConfig, WorkerGroupConfig, grpo_algorithm, ppo_algorithm
    from megatron_rlhf.trainer.rl_loop import build_components, shutdown_groups
    from megatron_rlhf.trainer.rl_step import RLState, rl_step

    prompts_file = tmp_path / "prompts.jsonl"
    _write_prompts(prompts_file, 4)
    ppo = ppo_algorithm()
    config = RLConfig(policy_dir=policy_dir, out_dir=str(tmp_path / "out"), prompt_files=(str(prompts_file),),
                      algorithm=ppo, prompts_per_step=2, n=8, max_new_tokens=8,
                      actor=WorkerGroupConfig(world_size=2, parallel=ParallelConfig(tensor_parallel=2)))
    records, _ = load_prompt_dataset(prompts_file)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    parts, groups, placement = build_components(config, tokenizer)
    try:
        for algorithm in (grpo_algorithm(), ppo):
            parts.algorithm = algorithm
            state = RLState(kl_controller=build_kl_controller("fixed", algorithm.kl_coef),
                            domain_stats=DomainRewardStats())
            for n in (1, 2, 4, 8):
                parts.sampling = type(parts.sampling)(n=n, max_new_tokens=8, seed=n)
                metrics, state = rl_step(parts, state, records[:2])
                name = f"{algorithm.advantage_estimator} n={n}"
                assert all(math.isfinite(v) for v in metrics.values()), (name, metrics)
                for key in ("reward/mean", "reward/math", "kl/mean", "entropy/mean", "response/length_mean",
                            "actor/clip_fraction", "ratio/engine_mean", "weight_sync/seconds", "time/rollout"):
                    assert key in metrics, (name, key)
                assert ("diversity/edit" in metrics) == (n > 1), name
                assert ("critic/loss" in metrics) == algorithm.needs_critic, name
                # the engine sampled with the weights the trainer holds: ratio 1 up to fp32 noise
                assert metrics["ratio/engine_max_abs_logprob_diff"] < 1e-3, (name, metrics)
                # one epoch of one minibatch: GRPO (KL loss) skips the old-policy pass, and its
                # metrics above came from the update's forward; PPO's KL penalty needs the pass
                assert metrics["actor/old_logprob_pass"] == float(algorithm.kl_mode == "penalty"), name
                assert ("time/actor_logprobs" in metrics) == (algorithm.kl_mode == "penalty"), name
                assert 0.0 < metrics["entropy/mean"] and abs(metrics["ratio/engine_mean"] - 1.0) < 1e-3, name
            assert state.step == 4
    finally:
        parts.router.close()
        shutdown_groups(groups, placement)
