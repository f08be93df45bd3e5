"""The RL studies of "Does RLHF Scale?": ``responses-per-prompt``, ``policy-size``, ``ppo-vs-grpo``
(and the Seed paper's ``pre-ppo``, in :mod:`.pre_ppo_study`).

Every arm is one :func:`~megatron_rlhf.trainer.rl_loop.run_rl` (the body of `train-rl`: Ray
workers, a vLLM engine, the hybrid reward router) from a tiny policy on the synthetic math and
code prompts, rewarded by the math and code verifiers. An arm reports its per-step curves (reward,
accuracy, KL, response length, from the run's metrics file) and its final accuracy: held-out
accuracy per domain (:func:`~megatron_rlhf.evaluation.held_out.evaluate_policy`, sampled with
vLLM, graded by the verifiers) when ``recipe.held_out_eval``; otherwise (``--quick``) the mean
training-rollout accuracy of the last half of the steps, and the report says so.

A killed arm with ``checkpoint_every`` > 0 resumes from its last checkpoint (run_rl's own resume).

Arms are keyed by their run (:func:`rl_arm_result`: policy, algorithm, n, prompts, rewards,
curriculum; seeded from that key), so an output folder runs an arm two studies share once: with
the default recipe, ``policy-size`` at the default hidden size, ``ppo-vs-grpo``'s ``grpo`` and
``responses-per-prompt`` at ``n = rl_n`` are one run. The key names each input file logically
(:class:`RLInput`: a data role, the base model's size, the arm that made it), never by path, so an
arm's seed and numbers do not depend on ``--out``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rlhf.studies import trend
from megatron_rlhf.studies.assets import base_model
from megatron_rlhf.studies.runner import Study, StudyContext, StudyResult

PAPER = '"Does RLHF Scale? Exploring the Impacts From Data, Model, and Method" (GLM)'
VERIFIED = ("math", "code")


def rl_data(context: StudyContext) -> dict[str, str]:
    """The synthetic RL data of the output folder (made once): prompts (math + code; every domain),
    held-out prompts, preference pairs and labelled responses (for a reward model)."""
    from megatron_rlhf.data.synthetic_tasks import CodeDifficulty, DemoDatasetSizes, MathDifficulty, write_demo_datasets

    recipe = context.recipe
    folder = context.shared_dir / "rl_data"
    marker = folder / "paths.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    sizes = DemoDatasetSizes(
        sft_per_domain=recipe.rl_prompts_per_domain, sft_eval_per_domain=0,
        prompts_per_domain=recipe.rl_prompts_per_domain,
        eval_prompts_per_domain=recipe.eval_prompts_per_domain, preference_pairs=4 * recipe.rl_prompts_per_domain,
        preference_eval_pairs=0, math=MathDifficulty(operand_min=1, operand_max=5, min_operations=1, max_operations=1,
                                                     multiplication=False), code=CodeDifficulty(constant_max=200))
    files = write_demo_datasets(folder, seed=recipe.seed, sizes=sizes)
    paths = {name: str(path) for name, path in vars(files).items()}
    for split in ("prompts_train", "prompts_eval"):
        rows = [json.loads(line) for line in Path(paths[split]).read_text().splitlines()]
        verified = folder / f"{split}_verified.jsonl"
        verified.write_text("".join(json.dumps(row) + "\n" for row in rows if row["domain"] in VERIFIED))
        paths[f"{split}_verified"] = str(verified)
    verifiers = folder / "rewards_verified.yaml"
    verifiers.write_text(json.dumps({
        "sources": {"math": {"kind": "math_verifier"}, "code": {"kind": "code_verifier"}},
        "domains": {"math": {"sources": {"math": 1.0}}, "code": {"sources": {"code": 1.0}}}}))
    paths["rewards_verified"] = str(verifiers)
    marker.write_text(json.dumps(paths, indent=2))
    return paths


@dataclass(frozen=True)
class RLInput:
    """A file an RL arm reads: ``name``, what the arm's key (hence its seed) sees, says what it is
    (a data role such as ``prompts_train_verified``, ``llama_h64``, ``pre-ppo:selection``; ``:``
    joins parts), ``path`` where it is in this output folder. One name is one file per folder."""

    name: str
    path: str


def data_input(data: dict[str, str], role: str) -> RLInput:
    """The file of role ``role`` of :func:`rl_data`."""
    return RLInput(role, data[role])


def base_policy(context: StudyContext, hidden_size: int | None = None) -> RLInput:
    """The tiny base model of ``hidden_size`` (default: the recipe's) as a policy."""
    hidden_size = hidden_size or context.recipe.hidden_size
    return RLInput(f"llama_h{hidden_size}", base_model(context.shared_dir, context.recipe, hidden_size))


def rl_arm_result(context: StudyContext, arm: str, policy: RLInput, algorithm: Any, n: int, prompts: RLInput,
                  eval_prompts: RLInput, rewards: RLInput, curriculum: Any = None) -> dict[str, Any]:
    """The result of RL arm ``arm`` of this study: the run of these inputs (run once per output
    folder, whichever study asks first; see the module docstring)."""
    from dataclasses import asdict

    key = {"kind": "rl", "policy": policy.name, "algorithm": asdict(algorithm), "n": n, "prompts": prompts.name,
           "eval_prompts": eval_prompts.name, "rewards": rewards.name,
           "curriculum": asdict(curriculum) if curriculum is not None else None}
    return context.shared_arm(arm, json.loads(json.dumps(key, default=str)), lambda arm_dir, seed: rl_arm(
        context, arm_dir, policy.path, algorithm, n, prompts.path, eval_prompts.path, rewards.path, curriculum, seed))


def rl_arm(context: StudyContext, arm_dir: Path, policy: str, algorithm: Any, n: int, prompts: str,
           eval_prompts: str, reward_yaml: str, curriculum: Any, seed: int) -> dict[str, Any]:
    """One RL run and its evaluation (see the module docstring)."""
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig
    from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl
    from megatron_rlhf.rewards.reward_config import load_reward_config
    from megatron_rlhf.trainer.rl_config import RLConfig
    from megatron_rlhf.trainer.rl_loop import run_rl

    recipe = context.recipe
    checkpoint_every = recipe.rl_steps // 2 if recipe.rl_steps >= 4 else 0
    run_dir = arm_dir / "run"
    if checkpoint_every == 0:
        shutil.rmtree(run_dir, ignore_errors=True)  # no checkpoint to resume from: start clean
    samples = recipe.rl_prompts_per_step * n
    config = RLConfig(
        policy_dir=policy, out_dir=str(run_dir), prompt_files=(prompts,), algorithm=algorithm, steps=recipe.rl_steps,
        prompts_per_step=recipe.rl_prompts_per_step, n=n, temperature=1.0, max_new_tokens=recipe.max_new_tokens,
        max_prompt_tokens=128, update=PPOUpdateConfig(ppo_epochs=1, num_minibatches=1, micro_batch_size=samples),
        actor_optimizer=OptimizerSettings(lr=recipe.rl_lr, clip_grad=1.0),
        critic_optimizer=OptimizerSettings(lr=1e-3, clip_grad=1.0), reward_config=load_reward_config(reward_yaml),
        curriculum=curriculum, checkpoint_every=checkpoint_every, seed=seed, tensorboard=False,
        console=False)
    result = run_rl(config)
    rows = read_metrics_jsonl(result.metrics_file)
    curves = {key: [float(row.get(key, float("nan"))) for row in rows]
              for key in ("reward/mean", "kl/mean", "response/length_mean", *(f"accuracy/{d}" for d in VERIFIED),
                          *(f"score/{d}" for d in ("general",)))}
    late = rows[len(rows) // 2 :]
    training_accuracy = {domain: _mean([row[f"accuracy/{domain}"] for row in late if f"accuracy/{domain}" in row])
                         for domain in VERIFIED}
    evaluated = None
    if recipe.held_out_eval:
        evaluated = held_out_accuracy(context, result.policy_dir, eval_prompts, reward_yaml)
    accuracy = evaluated["accuracy"] if evaluated else training_accuracy
    count = evaluated["count"] if evaluated else recipe.rl_prompts_per_step * n * max(len(late), 1)
    return {"n": n, "policy": result.policy_dir, "steps": [row["step"] for row in rows], "curves": curves,
            "accuracy": accuracy, "accuracy_count": count,
            "accuracy_source": "held-out" if evaluated else "training rollouts",
            "training_accuracy": training_accuracy, "first_step_accuracy": {
                domain: rows[0].get(f"accuracy/{domain}") for domain in VERIFIED} if rows else {}}


def held_out_accuracy(context: StudyContext, policy: str, eval_prompts: str, reward_yaml: str) -> dict[str, Any]:
    """Sampled held-out accuracy per verified domain (and mean reward per domain) of ``policy``."""
    from megatron_rlhf.data.prompts import load_prompt_dataset
    from megatron_rlhf.evaluation.held_out import HeldOutEvalConfig, evaluate_policy
    from megatron_rlhf.rewards.reward_config import build_sources, load_reward_config
    from megatron_rlhf.rewards.router import HybridRewardRouter

    records, _ = load_prompt_dataset(eval_prompts)
    rewards = load_reward_config(reward_yaml)
    router = HybridRewardRouter(rewards.router, build_sources(rewards))
    try:
        evaluation = evaluate_policy(policy, records, router, HeldOutEvalConfig(
            samples_per_prompt=4, max_new_tokens=context.recipe.max_new_tokens, seed=context.recipe.seed + 3))
    finally:
        router.close()
    domains = {domain: vars(scores) for domain, scores in evaluation.domains.items()}
    return {"accuracy": {d: s["sampled_accuracy"] for d, s in domains.items() if d in VERIFIED},
            "count": 4 * min((s["prompts"] for d, s in domains.items() if d in VERIFIED), default=1),
            "domains": domains}


def _verified_inputs(data: dict[str, str]) -> tuple[RLInput, RLInput, RLInput]:
    """(training prompts, held-out prompts, rewards) of the verified domains (math and code)."""
    return (data_input(data, "prompts_train_verified"), data_input(data, "prompts_eval_verified"),
            data_input(data, "rewards_verified"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def verified_accuracy(arm: dict[str, Any]) -> float:
    """Mean accuracy over the verified domains of an arm."""
    return _mean([value for value in arm["accuracy"].values() if value is not None])


def _accuracy_note(arms: dict[str, Any]) -> str:
    first = next(iter(arms.values()))
    return (f"Accuracy: {first['accuracy_source']} (mean over math and code); over about {first['accuracy_count']} "
            f"graded answers per arm.")


def _recipe_note(context: StudyContext, policy_sizes: str = "") -> str:
    recipe = context.recipe
    return (f"{recipe.rl_steps} RL steps x {recipe.rl_prompts_per_step} prompts from a tiny random-weight llama "
            f"(hidden {policy_sizes or recipe.hidden_size}, {recipe.num_layers} layers), rewards from the math and "
            "code "
            f"verifiers; with no SFT, accuracies near 0 are expected at this size.")


# --- responses-per-prompt --------------------------------------------------------------------------


def run_responses_per_prompt(context: StudyContext) -> StudyResult:
    from megatron_rlhf.trainer.rl_config import grpo_algorithm

    recipe, data = context.recipe, rl_data(context)
    policy = base_policy(context)
    arms = {}
    for n in recipe.responses_per_prompt:
        algorithm = grpo_algorithm(kl_mode="none") if n == 1 else grpo_algorithm()
        arms[n] = rl_arm_result(context, f"n{n}", policy, algorithm, n, *_verified_inputs(data))
    ns = list(arms)
    accuracy = [verified_accuracy(arms[n]) for n in ns]
    count = min(arm["accuracy_count"] for arm in arms.values())
    verdict = trend.plateau_verdict("more responses per prompt help at first, then plateau", ns, accuracy, count)
    rows = [[n, accuracy[i], arms[n]["curves"]["reward/mean"][-1], arms[n]["curves"]["kl/mean"][-1],
             arms[n]["curves"]["response/length_mean"][-1]] for i, n in enumerate(ns)]
    return StudyResult(
        "Responses per prompt at a fixed number of prompts per update", f"{PAPER}, section 4.2",
        ["n", "accuracy", "final reward", "final KL", "final length"], rows, "responses per prompt (n)", "accuracy",
        {"accuracy": (ns, accuracy)}, [verdict],
        [_recipe_note(context), _accuracy_note({str(n): a for n, a in arms.items()}),
         "n = 1 has no group to normalise against: GRPO's advantages are 0 there (the paper's point of comparison)."],
        {str(n): arm for n, arm in arms.items()})


# --- policy-size ------------------------------------------------------------------------------------


def run_policy_size(context: StudyContext) -> StudyResult:
    from megatron_rlhf.trainer.rl_config import grpo_algorithm

    recipe, data = context.recipe, rl_data(context)
    arms = {}
    for size in recipe.model_sizes:
        arms[size] = rl_arm_result(context, f"hidden{size}", base_policy(context, size), grpo_algorithm(),
                                   recipe.rl_n, *_verified_inputs(data))
    sizes = list(arms)
    gains = [_mean([arms[s]["training_accuracy"][d] - (arms[s]["first_step_accuracy"].get(d) or 0.0)
                    for d in VERIFIED]) for s in sizes]
    count = min(arm["accuracy_count"] for arm in arms.values())
    verdict = trend.increases_verdict("larger policies gain less from RL with a fixed reward", sizes,
                                      [-gain for gain in gains], count)
    verdict = trend.Verdict(verdict.claim, verdict.verdict, f"gains (late minus first-step training accuracy) "
                            f"{[round(g, 3) for g in gains]}; trend of the negated gain: {verdict.evidence}",
                            verdict.numbers)
    rows = [[size, gains[i], verified_accuracy(arms[size]), arms[size]["curves"]["kl/mean"][-1]]
            for i, size in enumerate(sizes)]
    return StudyResult(
        "Policy size: RL gain by policy size, fixed reward", f"{PAPER}, section 4.2.4",
        ["hidden size", "accuracy gain", "final accuracy", "final KL"], rows, "policy hidden size", "accuracy gain",
        {"gain": (sizes, gains)}, [verdict],
        [_recipe_note(context, "/".join(map(str, sizes))), _accuracy_note({str(s): a for s, a in arms.items()})],
        {str(size): arm for size, arm in arms.items()})


# --- ppo-vs-grpo ------------------------------------------------------------------------------------


def run_ppo_vs_grpo(context: StudyContext) -> StudyResult:
    from megatron_rlhf.trainer.rl_config import grpo_algorithm, ppo_algorithm

    recipe, data = context.recipe, rl_data(context)
    policy = base_policy(context)
    algorithms = {"ppo": ppo_algorithm(), "grpo": grpo_algorithm(reward_shrink_alpha=1.0),
                  "grpo-shrink": grpo_algorithm(reward_shrink_alpha=0.5)}
    arms = {name: rl_arm_result(context, name, policy, algorithm, recipe.rl_n, *_verified_inputs(data))
            for name, algorithm in algorithms.items()}
    count = min(arm["accuracy_count"] for arm in arms.values())
    verdicts = [
        trend.no_difference_verdict("PPO and GRPO (with asymmetric reward shrinking) reach similar accuracy",
                                    ("PPO", verified_accuracy(arms["ppo"])),
                                    ("GRPO+shrink", verified_accuracy(arms["grpo-shrink"])), count),
        trend.curve_ranking_verdict("GRPO drifts further from the initial policy (higher KL) than PPO",
                                    ("GRPO+shrink", arms["grpo-shrink"]["curves"]["kl/mean"]),
                                    ("PPO", arms["ppo"]["curves"]["kl/mean"])),
        trend.curve_ranking_verdict("GRPO grows responses longer than PPO",
                                    ("GRPO+shrink", arms["grpo-shrink"]["curves"]["response/length_mean"]),
                                    ("PPO", arms["ppo"]["curves"]["response/length_mean"])),
    ]
    rows = [[name, verified_accuracy(arm), arm["curves"]["reward/mean"][-1], arm["curves"]["kl/mean"][-1],
             arm["curves"]["response/length_mean"][-1]] for name, arm in arms.items()]
    curves = {f"{name} reward": (arm["steps"], arm["curves"]["reward/mean"]) for name, arm in arms.items()}
    curves |= {f"{name} KL": (arm["steps"], arm["curves"]["kl/mean"]) for name, arm in arms.items()}
    return StudyResult(
        "PPO vs GRPO, with and without asymmetric reward shrinking", f"{PAPER}, section 4.2.5",
        ["algorithm", "accuracy", "final reward", "final KL", "final length"], rows, "RL step", "reward / KL",
        curves, verdicts, [_recipe_note(context), _accuracy_note(arms),
                           "grpo: reward_shrink_alpha 1 (no shrinking); grpo-shrink: 0.5 on negative rewards."],
        arms, log_x=False)


STUDIES = (
    Study("responses-per-prompt", "RL with n responses per prompt at fixed prompts per update",
          run_responses_per_prompt, True),
    Study("policy-size", "RL gain of policies of two or three sizes with the same reward", run_policy_size, True),
    Study("ppo-vs-grpo", "PPO vs GRPO with and without asymmetric reward shrinking", run_ppo_vs_grpo, True),
)
