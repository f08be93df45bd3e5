"""The ``pre-ppo`` study (ByteDance Seed, "Exploring Data Scaling Trends and Effects in RLHF"):
Pre-PPO prompt selection plus a math/code-first curriculum against uniform sampling.

Arms, each resumable:

1. ``reward_model``: the multi-task outcome RM of the demo (Bradley-Terry on general-chat
   preference pairs + BCE on labelled math/code answers), by ``train_reward_model``;
2. ``selection``: Pre-PPO (:func:`~megatron_rlhf.data.pre_ppo.select_prompts`): the initial
   policy answers every training prompt (vLLM), the RM scores the answers, scores are normalised
   per domain and the lowest-scoring half of each domain is kept (the prompts the RM finds hard,
   which the paper finds less prone to reward hacking);
3. ``uniform``: RL on every prompt, domains mixed uniformly;
4. ``pre-ppo``: RL on the selected prompts with math and code first (the first third of the steps),
   then every domain.

Both RL arms use the hybrid reward: the math and code verifiers, the RM for general chat. Measures
per arm: accuracy per verified domain (held-out, or training rollouts at ``--quick``) and the
reward-hacking signs the paper watches: the growth of the response length and of the RM's raw
score on general chat, next to the growth of the verifiers' accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from megatron_rlhf.studies import trend
from megatron_rlhf.studies.assets import base_model
from megatron_rlhf.studies.rl_studies import (VERIFIED, RLInput, base_policy, data_input, rl_arm_result, rl_data,
                                              verified_accuracy)
from megatron_rlhf.studies.runner import Study, StudyContext, StudyResult

PAPER = '"Exploring Data Scaling Trends and Effects in Reinforcement Learning from Human Feedback" (ByteDance Seed)'


def _train_rm(context: StudyContext, arm_dir: Path, data: dict[str, str]) -> dict[str, Any]:
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.data.reward_data import RewardTokenization
    from megatron_rlhf.trainer.reward_model import RewardTrainingConfig
    from megatron_rlhf.trainer.reward_model_run import TrainRMConfig, train_reward_model

    recipe = context.recipe
    output = arm_dir / "reward_model"
    shutil.rmtree(output, ignore_errors=True)
    metrics = train_reward_model(TrainRMConfig(
        model=base_model(context.shared_dir, recipe), role="reward",
        train_files=(data["preference_train"], data["reasoning_labelled"]), output=str(output), steps=recipe.rm_steps,
        seed=context.seed("reward_model"), tokenization=RewardTokenization(max_length=256),
        training=RewardTrainingConfig(pairs_per_microbatch=4, responses_per_microbatch=4),
        optimizer=OptimizerSettings(lr=recipe.rm_lr, min_lr=recipe.rm_lr / 10, lr_decay_style="cosine",
                                    lr_decay_steps=recipe.rm_steps)))
    return {"checkpoint": str(output / "checkpoint"),
            **{key: value for key, value in metrics.items() if isinstance(value, (int, float, str))}}


def _select(context: StudyContext, arm_dir: Path, data: dict[str, str], checkpoint: str) -> dict[str, Any]:
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.data.pre_ppo import PrePPOConfig, select_prompts
    from megatron_rlhf.data.prompts import load_prompt_dataset
    from megatron_rlhf.parallel.launch import spawn
    from megatron_rlhf.rewards.reward_model_source import RewardModelSourceConfig, score_in_this_rank
    from megatron_rlhf.rewards.sample import RewardSample
    from megatron_rlhf.rollout.engine import RolloutEngine

    recipe = context.recipe
    records, _ = load_prompt_dataset(data["prompts_train"])
    selection = PrePPOConfig(keep_fraction=0.5, merge="selected_only", samples_per_prompt=2, chunk_size=len(records))
    engine_config = RolloutConfig(model_dir=base_model(context.shared_dir, recipe), max_model_len=256,
                                  overlong_prompts="drop", seed=context.seed("selection"), weight_transfer_backend=None)
    with RolloutEngine(engine_config) as engine:
        def sample(prompts, n):
            batch = engine.generate([p.as_messages() for p in prompts],
                                    SamplingSettings(n=n, max_new_tokens=recipe.max_new_tokens, seed=recipe.seed))
            return [texts or [""] * n for texts in batch.texts_by_prompt(engine.tokenizer, len(prompts))]

        def score(prompts, responses):
            samples = [RewardSample(f"{p.id}:{k}", p.domain, p.text, text) for p, row in zip(prompts, responses)
                       for k, text in enumerate(row)]
            results = spawn(score_in_this_rank, 1, RewardModelSourceConfig(ckpt_dir=checkpoint), samples)[0]
            flat = iter([r.reward if r.reward is not None else 0.0 for r in results])
            return [[next(flat) for _ in row] for row in responses]

        result = select_prompts(records, sample, score, selection)
    path = arm_dir / "prompts_selected.jsonl"
    originals = {json.loads(line)["id"]: line for line in Path(data["prompts_train"]).read_text().splitlines()}
    path.write_text("".join(originals[record.id] + "\n" for record in result.merged))
    return {"prompts": str(path), "candidates": len(records), "selected": len(result.selected),
            "domains": {d: {"selected": s.selected, "mean_score": s.mean_score} for d, s in result.domains.items()}}


def _hybrid_reward_yaml(arm_dir: Path, checkpoint: str) -> str:
    path = arm_dir.parent / "rewards_hybrid.yaml"
    path.write_text(json.dumps({
        "sources": {"math": {"kind": "math_verifier"}, "code": {"kind": "code_verifier"},
                    "reward_model": {"kind": "reward_model", "ckpt_dir": checkpoint}},
        "domains": {"math": {"sources": {"math": 1.0}}, "code": {"sources": {"code": 1.0}},
                    "general": {"sources": {"reward_model": 1.0}, "normalization": "batch_zscore"}}}))
    return str(path)


def _growth(curve: list[float]) -> float:
    finite = [value for value in curve if value == value]
    return finite[-1] - finite[0] if finite else float("nan")


def _finite_mean(values: tuple[float, ...]) -> float:
    finite = [value for value in values if value == value]
    return sum(finite) / len(finite) if finite else float("nan")


def run_pre_ppo(context: StudyContext) -> StudyResult:
    from megatron_rlhf.data.curriculum import CurriculumConfig
    from megatron_rlhf.trainer.rl_config import grpo_algorithm

    recipe, data = context.recipe, rl_data(context)
    policy = base_policy(context)
    rm = context.arm("reward_model", lambda arm_dir: _train_rm(context, arm_dir, data))
    selected = context.arm("selection", lambda arm_dir: _select(context, arm_dir, data, rm["checkpoint"]))
    # named by the arms that made them (this study's, one per folder), not by their paths
    rewards = RLInput(f"rewards_hybrid:{context.name}:reward_model",
                      _hybrid_reward_yaml(context.out_dir / "arms" / "uniform", rm["checkpoint"]))
    selected_prompts = RLInput(f"{context.name}:selection", selected["prompts"])
    train, held_out = data_input(data, "prompts_train"), data_input(data, "prompts_eval")
    switch = max(1, round(recipe.rl_steps / 3))
    arms = {
        "uniform": rl_arm_result(context, "uniform", policy, grpo_algorithm(), recipe.rl_n, train, held_out, rewards),
        "pre-ppo": rl_arm_result(context, "pre-ppo", policy, grpo_algorithm(), recipe.rl_n, selected_prompts,
                                 held_out, rewards,
                                 curriculum=CurriculumConfig.first_then_all(VERIFIED, switch, seed=recipe.seed)),
    }
    count = min(arm["accuracy_count"] for arm in arms.values())
    verdict = trend.ranking_verdict("Pre-PPO selection with math/code first reaches a higher verified accuracy than "
                                    "uniform sampling", ("pre-ppo", verified_accuracy(arms["pre-ppo"])),
                                    ("uniform", verified_accuracy(arms["uniform"])), count)
    rows = []
    for name, arm in arms.items():
        curves = arm["curves"]
        rows.append([name, *(arm["accuracy"].get(d) or 0.0 for d in VERIFIED),
                     _growth(curves["response/length_mean"]), _growth(curves["score/general"]),
                     _growth([_finite_mean(pair) for pair in zip(curves["accuracy/math"], curves["accuracy/code"])])])
    curves = {f"{name} length": (arm["steps"], arm["curves"]["response/length_mean"]) for name, arm in arms.items()}
    curves |= {f"{name} RM score (general)": (arm["steps"], arm["curves"]["score/general"])
               for name, arm in arms.items()}
    return StudyResult(
        "Pre-PPO selection + math/code-first curriculum vs uniform sampling", f"{PAPER}, Pre-PPO and early training",
        ["arm", "math accuracy", "code accuracy", "length growth", "RM score growth (general)",
         "verifier accuracy growth"], rows, "RL step", "length / RM score", curves, [verdict],
        [f"Pre-PPO kept {selected['selected']} of {selected['candidates']} prompts (lowest RM score per domain); "
         f"math and code only for the first {switch} step(s).",
         "Reward-hacking signs: the length and the RM's raw score rising while the verifiers' accuracy does not.",
         f"Accuracy: {arms['uniform']['accuracy_source']}; about {count} graded answers per arm.",
         "A first or last step without general prompts gives NaN for the general RM score."],
        {"reward_model": rm, "selection": selected, **arms}, log_x=False)


STUDY = Study("pre-ppo", "Pre-PPO selection + math/code-first curriculum vs uniform sampling (Seed)", run_pre_ppo, True)
