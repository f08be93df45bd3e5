"""One-step-off-policy GRPO (``rollout_mode: one_step_off``) still raises the reward, and resumes.

The set-up of :mod:`tests.integration.test_rl_improves_reward` (the same tiny llama and
target-token reward, built once per session: ``target_token_inputs``; 4 prompts x 8 responses,
2 minibatches per step), with a small k3 KL to a reference in the loss (so the reference pass of
each background batch, issued as soon as that batch is generated, is exercised end to end: with
it and without it, the same run logged the same ``kl/mean`` at every step, bit for bit, checked by
hand), run through ``run_rl`` with the asynchronous schedule: a
disaggregated vLLM engine (its own Ray actor) generates the batch of step k+1 while the Megatron
actor trains on step k, weights synced after every update, and the policy loss corrected with
token-level truncated importance sampling against the engine's sampling log-probs.

The run is made in two parts: ``run_rl`` to step ``SPLIT`` (checkpoint at the end; the batch in
flight is discarded), then a second ``run_rl`` on the same ``out_dir`` that resumes there and
runs to ``STEPS``. Properties: the mean reward of the last steps is at least the first steps'
plus ``MARGIN`` (as in the synchronous test); every step after the first of each part trains on
samples one update stale (``rollout/staleness`` 1; the first step of a part is on-policy, 0);
the mismatch KL is logged, clearly positive on the first stale step and ~0 on the first resumed
step (the engine was given the restored weights), and the weight-sync alarm never fires (it only
judges on-policy steps).

Steps: 16, resumed at 8 (were 30, resumed at 12). The reward curve of a 30-step run (split at 12,
2-core machine, target 'C') starts at 0.012, 0.019 (start 0.016, so the bar is 0.216), rises past
0.2 at step 7 and reaches 0.52-0.69 over steps 11-15, 0.75-0.80 from step 18 on: the mean of the
last 5 of 16 steps (0.64 on that curve) clears the bar with room; the later steps only re-measured
the plateau. The split at 8 keeps both parts longer than one step, so every staleness and
mismatch-KL check still has its stale steps on each side of the resume.
"""

from __future__ import annotations

import math

import pytest

from tests.integration.target_token_reward import (
    MAX_NEW_TOKENS,
    NUM_PROMPTS,
    SAMPLES_PER_PROMPT,
    register_target_token_kind,
)
from tests.integration.test_rl_improves_reward import FIRST_STEPS, LAST_STEPS, MARGIN

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

STEPS = 16  # see the module docstring
SPLIT = 8


def _config(run_inputs: dict, steps: int):
    from megatron_rlhf.algorithms import AlgorithmConfig
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig
    from megatron_rlhf.rewards.reward_config import load_reward_config
    from megatron_rlhf.trainer.rl_config import RLConfig

    return RLConfig(
        policy_dir=run_inputs["hf_dir"], out_dir=str(run_inputs["root"] / "one_step_off"),
        prompt_files=(run_inputs["prompts"],),
        algorithm=AlgorithmConfig(advantage_estimator="grpo", kl_mode="loss", kl_estimator="k3", kl_coef=1e-3,
                                  rollout_is="token", rollout_is_threshold=2.0),
        steps=steps, prompts_per_step=NUM_PROMPTS, n=SAMPLES_PER_PROMPT, temperature=1.0,
        max_new_tokens=MAX_NEW_TOKENS, max_prompt_tokens=32,
        update=PPOUpdateConfig(num_minibatches=2, micro_batch_size=SAMPLES_PER_PROMPT * NUM_PROMPTS // 2),
        actor_optimizer=OptimizerSettings(lr=3e-3, clip_grad=1.0), reward_config=load_reward_config(run_inputs["rewards"]),
        placement="disaggregated", rollout_mode="one_step_off",
        checkpoint_every=0, seed=0, tensorboard=False, console=False,
    )


def test_one_step_off_raises_the_reward_and_resumes(target_token_inputs, ray_cluster):
    from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl
    from megatron_rlhf.trainer.rl_loop import run_rl

    run_inputs = target_token_inputs  # built once per session, shared with test_rl_improves_reward
    register_target_token_kind()  # the router is built in this (the driver's) process
    first = run_rl(_config(run_inputs, SPLIT))
    assert first.steps_run == SPLIT and first.resumed_from is None
    second = run_rl(_config(run_inputs, STEPS))
    assert second.resumed_from == SPLIT and second.steps_run == STEPS - SPLIT
    rows = read_metrics_jsonl(second.metrics_file)
    assert [row["step"] for row in rows] == list(range(STEPS))
    curve = [row["reward/probe"] for row in rows]
    staleness = [row["rollout/staleness"] for row in rows]
    print(f"one_step_off: target {run_inputs['target']!r}; rewards {[round(r, 3) for r in curve]}; "
          f"mismatch KL {[round(row['rollout_is/mismatch_kl'], 4) for row in rows]}; "
          f"KL to the reference {[round(row['kl/mean'], 4) for row in rows]}")
    assert staleness == [0.0 if step in (0, SPLIT) else 1.0 for step in range(STEPS)]
    assert rows[1]["rollout_is/mismatch_kl"] > 1e-3  # sampled before the first update
    assert rows[SPLIT]["rollout_is/mismatch_kl"] < 1e-4  # the resumed engine got the restored weights
    assert all(row["rollout_is/mismatch_kl"] >= 0 for row in rows)
    assert all(0 < row["rollout_is/weight_mean"] and row["rollout_is/weight_max"] <= 2.0 for row in rows)
    assert rows[-1]["ratio/sync_alarms"] == 0
    assert abs(rows[0]["kl/mean"]) < 1e-6  # the policy is the reference before its first update
    assert all(math.isfinite(row["kl/mean"]) and row["kl/mean"] >= 0 for row in rows)
    start = sum(curve[:FIRST_STEPS]) / FIRST_STEPS
    end = sum(curve[-LAST_STEPS:]) / LAST_STEPS
    assert end >= start + MARGIN, f"one_step_off: start {start:.3f}, end {end:.3f}, curve {curve}"
