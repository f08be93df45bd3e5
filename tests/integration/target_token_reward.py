"""The synthetic reward the RL learning tests train against, and their inputs, built once a session.

The reward is the test's own, plugged in as users plug in a reward source (a registered source
kind in the reward YAML): the share of a response's text made of a target token's text
(occurrences x its length / the response's length; all-target responses score 1). Text, not
re-encoded ids: re-encoding merges repeated pieces into other tokens.

Model: a tiny llama (hidden 64, 2 layers, head_dim 32, vocab 300, random weights with init std
0.2 instead of 0.02, so next-token distributions are not near-uniform 1/300). Target: the most
frequent token with visible text in a probe sample of the initial policy's responses (Hugging
Face sampling on CPU, not used for training); its share starts small.

:func:`make_run_inputs` writes the policy, the prompt file and the reward YAML; the integration
tier's ``target_token_inputs`` fixture (``tests/integration/conftest.py``) calls it once per
session for :mod:`tests.integration.test_rl_improves_reward` and
:mod:`tests.integration.test_rl_async` (each used to build and probe the same policy again).
Tests only read these inputs; each run writes under its own folder of ``root``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

VOCAB = 300
SPECIAL_IDS = 6  # train_tiny_tokenizer's special tokens take ids 0..5
INIT_STD = 0.2  # 10x the HF default: less flat next-token distributions than near-uniform 1/300
NUM_PROMPTS = 4
SAMPLES_PER_PROMPT = 8
MAX_NEW_TOKENS = 8
SOURCE_KIND = "test_target_token"
PROBE_SAMPLES = 32
"""Responses sampled per prompt from the initial policy to pick the target."""


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


def register_target_token_kind() -> None:
    """Register :data:`SOURCE_KIND` in this process (the RL driver builds the router here)."""
    from megatron_rlhf.rewards.reward_config import SOURCE_KINDS, register_source_kind

    if SOURCE_KIND not in SOURCE_KINDS:
        register_source_kind(SOURCE_KIND, TargetTokenConfig, TargetTokenSource)


def probe_target(hf_dir: str, prompts: list[str]) -> tuple[str, float]:
    """The text of the most frequent token with visible text among the initial policy's response
    tokens, and that token's share of them: :data:`PROBE_SAMPLES` sampled responses per prompt."""
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
                                     max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=PROBE_SAMPLES,
                                     pad_token_id=tokenizer.pad_token_id)
        for row in outputs[:, inputs.input_ids.shape[1]:].tolist():
            counts.update(token for token in row if token >= SPECIAL_IDS and tokenizer.decode([token]).strip())
            total += len(row)
    target, count = counts.most_common(1)[0]
    return tokenizer.decode([target]), count / max(total, 1)


def make_run_inputs(root: Path, tiny_hf_model: Callable[..., str]) -> dict[str, Any]:
    """``root`` (runs write their folders under it), ``hf_dir``, ``prompts`` (file), ``rewards``
    (YAML), ``target`` (text) and ``probe_frequency``: the inputs of the learning runs."""
    from transformers import AutoTokenizer

    hf_dir = tiny_hf_model("llama", seed=5, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=128,
                           initializer_range=INIT_STD)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    generator = torch.Generator().manual_seed(0)
    prompts = [tokenizer.decode(torch.randint(SPECIAL_IDS, VOCAB, (6,), generator=generator).tolist())
               for _ in range(NUM_PROMPTS)]
    prompt_file = root / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text, "domain": "probe"}) + "\n"
                                   for i, text in enumerate(prompts)))
    target, frequency = probe_target(hf_dir, prompts)
    reward_file = root / "rewards.yaml"
    reward_file.write_text(json.dumps({
        "sources": {"target": {"kind": SOURCE_KIND, "text": target}},
        "domains": {"probe": {"sources": {"target": 1.0}}},
    }))
    return {"root": root, "hf_dir": hf_dir, "prompts": str(prompt_file), "rewards": str(reward_file),
            "target": target, "probe_frequency": frequency}
