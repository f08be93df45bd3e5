"""Kill -9 an RL run during a rollout, during an update and during a checkpoint save; resume.

The run is the user command (`megatron-rlhf train-rl --config run.yaml`) in its own process
group. ``MEGATRON_RLHF_FAULT=<phase>@<step>+<seconds>`` makes the run SIGKILL its whole process
group (driver, Ray, workers, vLLM) that long after the phase first starts at a step >= <step>,
as a crashed node would.
Each restart is the same command. In deterministic CPU mode the metrics of every step of the
interrupted-and-resumed run equal those of an uninterrupted run: rewards, losses, gradient
norms, KL, entropy and response lengths, exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

STEPS = 4
COMPARED = ("reward/mean", "reward/math", "actor/loss", "actor/grad_norm", "actor/clip_fraction", "kl/mean",
            "entropy/mean", "response/length_mean", "ratio/engine_mean")


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
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("rl_resume")
    policy = make_tiny_hf_model("llama", root / "policy", seed=5, vocab_size=500,
                                tokenizer=train_tiny_tokenizer(500, seed=0))
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as handle:
        for index in range(8):
            handle.write(json.dumps({"prompt": f"What is {index} + 1?", "domain": "math",
                                     "ground_truth": str(index + 1)}) + "\n")
    return root, policy, prompts


def _config(root, policy, prompts, name: str):
    out_dir = root / name
    config = root / f"{name}.yaml"
    config.write_text(json.dumps({
        "policy_dir": str(policy), "out_dir": str(out_dir), "prompt_files": [str(prompts)], "preset": "grpo",
        "algorithm": {"kl_coef": 0.05}, "steps": STEPS, "prompts_per_step": 2, "n": 4, "max_new_tokens": 8,
        "actor_optimizer": {"lr": 0.001}, "checkpoint_every": 1, "tensorboard": False, "console": False,
        "seed": 7,
    }))
    return config, out_dir


def test_kill_during_rollout_update_and_save_then_resume_matches_uninterrupted(setup):
    root, policy, prompts = setup
    reference_config, reference_dir = _config(root, policy, prompts, "uninterrupted")
    _run(reference_config, None)
    expected = _metrics(reference_dir)
    assert sorted(expected) == list(range(STEPS))

    config, out_dir = _config(root, policy, prompts, "interrupted")
    # a rollout (step >= 1), an actor update (step >= 2), then a checkpoint save (step >= 3); each
    # restart resumes from the last complete checkpoint, wherever the previous kill landed
    for fault in ("rollout@1+0.3", "actor_update@2+0.2", "checkpoint@3+0.05"):
        code = _run(config, fault)
        assert code == -signal.SIGKILL, f"the run was not killed by {fault} (exit {code})"
    _run(config, None)
    resumed = _metrics(out_dir)
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        for key in COMPARED:
            assert resumed[step].get(key) == expected[step].get(key), (step, key, resumed[step].get(key), expected[step].get(key))
