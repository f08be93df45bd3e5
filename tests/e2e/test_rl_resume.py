"""Kill -9 an RL run during a rollout, during an update and during a checkpoint save; resume.

The run is the user command (`megatron-rlhf train-rl --config run.yaml`) in its own process
group. ``MEGATRON_RLHF_FAULT=<phase>@<step>+<seconds>`` makes the run SIGKILL its whole process
group (driver, Ray, workers, vLLM) that long after the phase first starts at a step >= <step>,
as a crashed node would.
Each restart is the same command. In deterministic CPU mode the metrics of every step of the
interrupted-and-resumed run equal those of an uninterrupted run: rewards, losses, gradient
norms, KL, entropy and response lengths, exactly.

One run covers every piece of state that changes the trajectory: PPO with a critic (its weights
and Adam state), an adaptive KL controller against the reference, and a hybrid reward whose
math domain combines the verifier with a trained reward model served by its own worker group,
normalised with ``running_zscore`` (the router's running moments and infra-error window). Size:
the smallest that still lands each kill inside its phase (3 steps, 2 prompts x 2 responses,
8 new tokens); the three kills land at steps 1, 1 and 2, so every restart has work to redo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
COMPARED = ("reward/mean", "reward/math", "actor/loss", "actor/grad_norm", "actor/clip_fraction", "kl/mean",
            "kl/coef", "entropy/mean", "response/length_mean", "ratio/engine_mean", "critic/loss",
            "critic/grad_norm", "ratio/sync_alarms")


def _run(config_path, fault: str | None, timeout: float = 400.0) -> int:
    env = dict(os.environ)
    env.pop("MEGATRON_RLHF_FAULT", None)
    if fault:
        env["MEGATRON_RLHF_FAULT"] = fault
    process = subprocess.Popen([sys.executable, "-m", "megatron_rlhf", "train-rl", "--config", str(config_path)],
                               env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    finally:
        try:  # whatever the run left behind in its group (Ray, vLLM) goes with it
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if fault is None and process.returncode != 0:
        raise AssertionError(output.decode(errors="replace")[-5000:])
    return process.returncode


def _metrics(out_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]
    return {row["step"]: row for row in rows}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer
    from megatron_rlhf.trainer.reward_model import RewardTrainingConfig
    from megatron_rlhf.trainer.reward_model_cli import TrainRMConfig, train_reward_model

    root = tmp_path_factory.mktemp("rl_resume")
    policy = make_tiny_hf_model("llama", root / "policy", seed=5, vocab_size=500,
                                tokenizer=train_tiny_tokenizer(500, seed=0))
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as handle:
        for index in range(8):
            handle.write(json.dumps({"prompt": f"What is {index} + 1?", "domain": "math",
                                     "ground_truth": str(index + 1)}) + "\n")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": "no"}) + "\n"
                             for i in range(4)))
    checkpoint = train_reward_model(TrainRMConfig(
        model=str(policy), role="reward", train_files=(str(pairs),), output=str(root / "rm"), steps=1,
        training=RewardTrainingConfig(pairs_per_microbatch=2, responses_per_microbatch=0),
        optimizer=OptimizerSettings(lr=1e-3)), world_size=1)["checkpoint"]
    rewards = root / "rewards.yaml"
    rewards.write_text(json.dumps({
        "sources": {"math": {"kind": "math_verifier"}, "rm": {"kind": "reward_model", "ckpt_dir": checkpoint}},
        "domains": {"math": {"sources": {"math": 1.0, "rm": 0.5}, "normalization": "running_zscore"}},
    }))
    return root, policy, prompts, rewards


def _config(root, policy, prompts, rewards, name: str):
    out_dir = root / name
    config = root / f"{name}.yaml"
    config.write_text(json.dumps({
        "policy_dir": str(policy), "out_dir": str(out_dir), "prompt_files": [str(prompts)], "preset": "ppo",
        "algorithm": {"kl_coef": 0.05, "kl_controller": "adaptive", "kl_target": 0.01, "kl_horizon": 10},
        "steps": STEPS, "prompts_per_step": 2, "n": 2, "max_new_tokens": 8, "reward_config": str(rewards),
        "actor_optimizer": {"lr": 0.001}, "critic_optimizer": {"lr": 0.001}, "checkpoint_every": 1,
        "tensorboard": False, "console": False, "seed": 7,
    }))
    return config, out_dir


def test_kill_during_rollout_update_and_save_then_resume_matches_uninterrupted(setup):
    root, policy, prompts, rewards = setup
    reference_config, reference_dir = _config(root, policy, prompts, rewards, "uninterrupted")
    _run(reference_config, None)
    expected = _metrics(reference_dir)
    assert sorted(expected) == list(range(STEPS))
    missing = [(step, key) for step in expected for key in COMPARED if expected[step].get(key) is None]
    assert not missing, f"the run did not log {missing}"  # e.g. no critic, no adaptive KL

    config, out_dir = _config(root, policy, prompts, rewards, "interrupted")
    # a rollout (step >= 1), an actor update (step >= 1), then a checkpoint save (step >= 2); each
    # restart resumes from the last complete checkpoint, wherever the previous kill landed
    for fault in ("rollout@1+0.3", "actor_update@1+0.2", "checkpoint@2+0.05"):
        code = _run(config, fault)
        assert code == -signal.SIGKILL, f"the run was not killed by {fault} (exit {code})"
    _run(config, None)
    resumed = _metrics(out_dir)
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        for key in COMPARED:
            assert resumed[step].get(key) == expected[step].get(key), (step, key, resumed[step].get(key), expected[step].get(key))
