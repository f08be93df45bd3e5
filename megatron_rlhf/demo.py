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
   fraction is added again to the prompt set (the answers and scores are kept in
   ``data/pre_ppo_samples.jsonl``);
5. ``eval_sft``: held-out accuracy per domain of the SFT policy (sampled with vLLM, graded by the
   verifiers; the reward model's mean score for general chat);
6. ``rl``: GRPO (or PPO with ``--algo ppo``) on Ray with vLLM rollouts, the hybrid reward
   (math and code verifiers, the reward model for chat) and a curriculum that trains math and
   code first;
7. ``eval_rl``: the same evaluation of the RL policy;
8. ``report``: ``report.md`` and PNG plots (reward, accuracy, KL, entropy, diversity, length),
   with each reward source's samples and mean raw reward over the RL run.

``--with-genrm`` (:mod:`megatron_rlhf.demo_genrm`) adds ``genrm`` (a generative judge trained by
`train-genrm`'s job, after ``reward_model``) and ``bon_reference`` (the reward model's Best-of-N
among Pre-PPO's answers as each general RL prompt's reference, after ``pre_ppo``), and the RL stage's general chat
reward becomes the GenRM's verdict against that reference plus the reward model's score: the
hybrid reward of the ByteDance Seed study (verifiers + GenRM + BT RM).

The summary line printed last reads ``math_accuracy_sft=<v> math_accuracy_rl=<v> report=<path>``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)
STAGES = ("prepare", "sft", "reward_model", "pre_ppo", "eval_sft", "rl", "eval_rl", "report")
GENRM_STAGES = {"genrm": "reward_model", "bon_reference": "pre_ppo"}
"""``--with-genrm``: stage -> the stage it runs after."""


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
    pre_ppo_samples: int = 2
    """Answers the SFT policy samples per training prompt for Pre-PPO (scored by the reward model);
    with ``with_genrm`` also the N of the general prompts' Best-of-N references. >= 1."""
    rl_steps: int = 30
    prompts_per_step: int = 16
    n: int = 8
    rl_lr: float = 2e-4
    max_new_tokens: int = 56
    eval_samples: int = 4
    curriculum_fraction: float = 0.34
    """Share of the RL steps that train on math and code only (then every domain)."""
    with_genrm: bool = False
    """Train a GenRM judge and reward general chat in RL with it (against the reward model's
    Best-of-N reference) plus the reward model: :mod:`megatron_rlhf.demo_genrm`."""
    genrm_epochs: int = 4
    """Epochs of the judge's training (``--with-genrm``). >= 1."""
    genrm_records_per_domain: int = 0
    """Judge training records kept per domain (math, code, general; the first ones); 0: all. >= 0."""
    genrm_batch_size: int = 32
    """Judge conversations per optimizer step. >= 1."""
    genrm_max_new_tokens: int = 16
    """Longest judgement in RL, in tokens (the verdict line is about 11). >= 1."""
    genrm_weight: float = 1.0
    """Weight of the GenRM's (z-scored) verdict in the general chat reward. Finite."""
    genrm_rm_weight: float = 0.5
    """Weight of the reward model's (z-scored) score in the general chat reward with the GenRM. Finite."""

    def __post_init__(self) -> None:
        if self.algo not in ("grpo", "ppo"):
            raise ValueError(f"algo={self.algo!r} (grpo or ppo)")
        if not 0 <= self.curriculum_fraction < 1:
            raise ValueError(f"curriculum_fraction={self.curriculum_fraction} must be in [0, 1)")
        for name, low in (("pre_ppo_samples", 1), ("genrm_epochs", 1), ("genrm_records_per_domain", 0),
                          ("genrm_batch_size", 1), ("genrm_max_new_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        for name in ("genrm_weight", "genrm_rm_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")

    def stages(self) -> tuple[str, ...]:
        """The stages this run goes through, in order."""
        order: list[str] = []
        for name in STAGES:
            order.append(name)
            if self.with_genrm:
                order += [extra for extra, after in GENRM_STAGES.items() if after == name]
        return tuple(order)


QUICK = dict(hidden_size=64, num_layers=2, sft_per_domain=48, sft_epochs=4, prompts_per_domain=16,
             eval_prompts_per_domain=8, rm_steps=4, rl_steps=2, prompts_per_step=4, n=2, max_new_tokens=24,
             eval_samples=1, genrm_records_per_domain=64, genrm_batch_size=16, genrm_epochs=3)
"""``--quick``: every stage at toy size (a smoke test of the pipeline, not of learning)."""


def run_demo_pipeline(config: DemoConfig) -> dict[str, Any]:
    """Run the stages not yet done; returns the summary (also in ``<out>/stages/report.json``)."""
    from megatron_rlhf import demo_genrm, demo_stages

    out = Path(config.out_dir)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    saved = out / "demo_config.json"
    # a run saved before a field existed ran with that field's default
    if saved.is_file() and {**asdict(DemoConfig()), **json.loads(saved.read_text())} != asdict(config):
        raise ValueError(f"{out} holds a demo run with other settings ({saved}); use --restart or another --out")
    saved.write_text(json.dumps(asdict(config), indent=2))
    results: dict[str, Any] = {}
    for name in config.stages():
        marker = out / "stages" / f"{name}.json"
        if marker.is_file():
            results[name] = json.loads(marker.read_text())
            log.info("stage %s: done earlier (%s)", name, marker)
            continue
        module = demo_genrm if name in GENRM_STAGES else demo_stages
        stage: Callable[..., dict[str, Any]] = getattr(module, f"stage_{name}")
        started = time.perf_counter()
        log.info("stage %s: starting", name)
        result = stage(config, out, results)
        result["seconds"] = round(time.perf_counter() - started, 1)
        marker.write_text(json.dumps(result, indent=2))
        results[name] = result
        log.info("stage %s: done in %.0f s", name, result["seconds"])
    return results["report"]

