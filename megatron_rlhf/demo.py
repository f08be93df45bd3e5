"""The `megatron-rlhf demo` job: the whole pipeline on one CPU machine, from nothing to an RL-trained
policy (its arguments: :mod:`megatron_rlhf.cli.demo`).

Stages (each writes ``<out>/stages/<name>.json`` when done; a rerun skips finished stages, so a
killed demo continues where it stopped, and the RL stage resumes from its own checkpoints):

1. ``prepare``: a tokenizer trained on synthetic text, a tiny llama with random weights, and the
   synthetic data sets (math word problems with numeric answers, small Python functions checked
   by tests in the sandbox, general chat with preference pairs), with held-out splits; like
   real SFT data, a share (``sft_noise``) of the math and code answers are wrong solutions;
2. ``sft``: supervised fine-tuning of the base model on chat data (loss on responses only);
3. ``reward_model``: the multi-task outcome reward model of "Does RLHF Scale?" (Bradley-Terry on
   preference pairs + BCE on correctness-labelled math/code answers), started from the SFT model;
4. ``pre_ppo``: Pre-PPO prompt selection (ByteDance Seed): the SFT policy answers every training
   prompt, the reward model scores the answers, scores are normalised per domain and the hardest
   fraction is added again to the prompt set;
5. ``eval_sft``: held-out accuracy per domain of the SFT policy (sampled with vLLM, graded by the
   verifiers; the reward model's mean score for general chat);
6. ``rl``: GRPO (or PPO with ``--algo ppo``) on Ray with vLLM rollouts, the hybrid reward
   (math and code verifiers, the reward model for chat) and a curriculum that trains math and
   code first;
7. ``eval_rl``: the same evaluation of the RL policy;
8. ``report``: ``report.md`` and PNG plots (reward, accuracy, KL, entropy, diversity, length).

The summary line printed last reads ``math_accuracy_sft=<v> math_accuracy_rl=<v> report=<path>``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)
STAGES = ("prepare", "sft", "reward_model", "pre_ppo", "eval_sft", "rl", "eval_rl", "report")


@dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "outputs/demo"
    algo: str = "grpo"
    """grpo | ppo."""
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    vocab_size: int = 512
    sft_per_domain: int = 500
    """SFT conversations per domain (math, code, general)."""
    sft_epochs: int = 8
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    sft_noise: float = 0.4
    """Share of math and code SFT conversations whose answer is replaced by a wrong solution."""
    prompts_per_domain: int = 96
    """RL training prompts per domain (before Pre-PPO adds the hardest again)."""
    eval_prompts_per_domain: int = 48
    rm_steps: int = 120
    pre_ppo_keep_fraction: float = 0.5
    rl_steps: int = 30
    prompts_per_step: int = 16
    n: int = 8
    rl_lr: float = 2e-4
    max_new_tokens: int = 56
    eval_samples: int = 4
    curriculum_fraction: float = 0.34
    """Share of the RL steps that train on math and code only (then every domain)."""

    def __post_init__(self) -> None:
        if self.algo not in ("grpo", "ppo"):
            raise ValueError(f"algo={self.algo!r} (grpo or ppo)")
        if not 0 <= self.curriculum_fraction < 1:
            raise ValueError(f"curriculum_fraction={self.curriculum_fraction} must be in [0, 1)")


QUICK = dict(hidden_size=64, num_layers=2, sft_per_domain=96, prompts_per_domain=16, eval_prompts_per_domain=8,
             rm_steps=4, rl_steps=2, prompts_per_step=4, n=2, max_new_tokens=24, eval_samples=1)
"""``--quick``: every stage at toy size (a smoke test of the pipeline, not of learning)."""


def run_demo_pipeline(config: DemoConfig) -> dict[str, Any]:
    """Run the stages not yet done; returns the summary (also in ``<out>/stages/report.json``)."""
    from megatron_rlhf import demo_stages

    out = Path(config.out_dir)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    saved = out / "demo_config.json"
    if saved.is_file() and json.loads(saved.read_text()) != asdict(config):
        raise ValueError(f"{out} holds a demo run with other settings ({saved}); use --restart or another --out")
    saved.write_text(json.dumps(asdict(config), indent=2))
    results: dict[str, Any] = {}
    for name in STAGES:
        marker = out / "stages" / f"{name}.json"
        if marker.is_file():
            results[name] = json.loads(marker.read_text())
            log.info("stage %s: done earlier (%s)", name, marker)
            continue
        stage: Callable[..., dict[str, Any]] = getattr(demo_stages, f"stage_{name}")
        started = time.perf_counter()
        log.info("stage %s: starting", name)
        result = stage(config, out, results)
        result["seconds"] = round(time.perf_counter() - started, 1)
        marker.write_text(json.dumps(result, indent=2))
        results[name] = result
        log.info("stage %s: done in %.0f s", name, result["seconds"])
    return results["report"]

