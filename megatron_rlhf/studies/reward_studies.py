"""The reward-model studies of "Does RLHF Scale?" (no RL loop): ``rm-data``, ``prm-vs-orm``,
``rm-size``.

Each arm trains one reward model with :func:`~megatron_rlhf.trainer.reward_model_run.train_reward_model`
(the body of `train-rm`, in its own processes) on labelled math candidates
(:mod:`~megatron_rlhf.studies.math_candidates`), then scores the shared held-out candidates in a
fresh process and keeps its Best-of-N curve (:func:`~megatron_rlhf.evaluation.best_of_n.best_of_n_accuracy`,
the `eval-bon` selection rule; grades from the real math verifier). Every curve sits between
random choice (the mean correctness of the first N candidates) and pass@N (the oracle), both
reported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from megatron_rlhf.studies import trend
from megatron_rlhf.studies.assets import base_model, bon_candidates, math_split
from megatron_rlhf.studies.runner import Study, StudyContext, StudyResult

PAPER = '"Does RLHF Scale? Exploring the Impacts From Data, Model, and Method" (GLM)'
PRM_AGGREGATES = ("last", "min", "product", "mean")


def _score_in_this_rank(ckpt_dir: str, samples: Sequence[Any]) -> list[tuple[float | None, list[float] | None]]:
    """(reward, step rewards) of every sample by the reward model at ``ckpt_dir`` (a spawned rank)."""
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.rewards.learned import load_learned_reward_source

    initialize_parallel(ParallelConfig())
    source = load_learned_reward_source(ckpt_dir, ParallelConfig())
    results = []
    for start in range(0, len(samples), 256):
        results.extend(source.score(list(samples[start : start + 256])))
    return [(result.reward, None if result.step_rewards is None else list(result.step_rewards)) for result in results]


def train_and_evaluate(context: StudyContext, arm_dir: Path, arm: str, model: str, role: str,
                       records: list[dict[str, Any]], aggregates: Sequence[str] = ("outcome",)) -> dict[str, Any]:
    """Train one reward model on ``records`` and return its Best-of-N curve per aggregate."""
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.data.jsonl import write_jsonl
    from megatron_rlhf.data.reward_data import RewardTokenization
    from megatron_rlhf.evaluation.best_of_n import aggregate_result, best_of_n_accuracy, bon_sizes
    from megatron_rlhf.parallel.launch import spawn
    from megatron_rlhf.rewards.sample import RewardResult, RewardStatus, Verdict
    from megatron_rlhf.trainer.reward_model import RewardTrainingConfig
    from megatron_rlhf.trainer.reward_model_run import TrainRMConfig, train_reward_model

    import torch

    recipe = context.recipe
    data = arm_dir / "train.jsonl"
    write_jsonl(data, records)
    output = arm_dir / "reward_model"
    shutil.rmtree(output, ignore_errors=True)  # an arm killed mid-training: train-rm refuses a non-empty folder
    metrics = train_reward_model(TrainRMConfig(
        model=model, role=role, train_files=(str(data),), output=str(output), steps=recipe.rm_steps,
        seed=context.seed(arm), tokenization=RewardTokenization(max_length=256),
        training=RewardTrainingConfig(pairs_per_microbatch=0, responses_per_microbatch=8),
        optimizer=OptimizerSettings(lr=recipe.rm_lr, min_lr=recipe.rm_lr / 10, lr_decay_style="cosine",
                                    lr_decay_steps=recipe.rm_steps),
    ))
    samples, correct = bon_candidates(context.shared_dir, recipe)
    flat = [sample for group in samples for sample in group]
    scored = spawn(_score_in_this_rank, 1, str(output / "checkpoint"), flat)[0]
    sizes = bon_sizes(recipe.bon_n_max)
    curves = {}
    for aggregate in aggregates:
        values = [aggregate_result(RewardResult(reward, RewardStatus.SCORED, Verdict.OK, step_rewards=steps)
                                   if reward is not None else RewardResult(None, RewardStatus.INFRA_ERROR,
                                                                           Verdict.SCORER_ERROR), aggregate)
                  for reward, steps in scored]
        scores = torch.tensor(values, dtype=torch.float64).reshape(correct.shape)
        curves[aggregate] = best_of_n_accuracy(scores, correct, sizes)
    plain = {key: value for key, value in metrics.items() if isinstance(value, (int, float, str)) or value is None}
    return {"arm": arm, "role": role, "records": len(records), "curves": curves, "train_metrics": plain}


def _bon_reference(context: StudyContext) -> dict[str, Any]:
    from megatron_rlhf.evaluation.best_of_n import bon_sizes, pass_at_n, random_choice_accuracy

    _, correct = bon_candidates(context.shared_dir, context.recipe)
    sizes = bon_sizes(context.recipe.bon_n_max)
    return {"sizes": sizes, "pass@N": pass_at_n(correct, sizes), "random": random_choice_accuracy(correct, sizes),
            "prompts": int(correct.shape[0]), "correct_share": float(correct.double().mean())}


def _table(reference: dict[str, Any], curves: dict[str, list[float]]) -> tuple[list[str], list[list[Any]]]:
    columns = ["N", "pass@N (oracle)", "random choice", *curves]
    rows = [[n, reference["pass@N"][i], reference["random"][i], *(curve[i] for curve in curves.values())]
            for i, n in enumerate(reference["sizes"])]
    return columns, rows


def _notes(context: StudyContext, reference: dict[str, Any]) -> list[str]:
    recipe = context.recipe
    return [f"{reference['prompts']} held-out math problems x {recipe.bon_n_max} candidates "
            f"({reference['correct_share']:.0%} graded correct by the math verifier); reward models: "
            f"{recipe.rm_steps} steps from tiny random-weight llamas (hidden {recipe.hidden_size}, "
            f"{recipe.num_layers} layers).",
            "Candidates come from the synthetic generator (right solutions and solutions with one slipped step), not "
            "from a policy: the study measures the reward models' selection, as Best-of-N does.",
            f"Differences count only beyond {trend.Z:g} binomial standard errors over the {reference['prompts']} "
            "prompts."]


# --- rm-data --------------------------------------------------------------------------------------


def run_rm_data(context: StudyContext) -> StudyResult:
    recipe = context.recipe
    _, train = math_split(recipe)
    model = base_model(context.shared_dir, recipe)
    reference = _bon_reference(context)
    from megatron_rlhf.studies.math_candidates import labelled_records

    arms = {}
    for per_prompt in recipe.rm_data_responses_per_prompt:
        prompts = recipe.rm_data_size // per_prompt
        name = f"{prompts}x{per_prompt}"
        arms[name] = context.arm(name, lambda arm_dir, name=name, prompts=prompts, per_prompt=per_prompt:
                                 train_and_evaluate(context, arm_dir, name, model, "reward", labelled_records(
                                     train[:prompts], per_prompt, recipe.candidate_correct_rate,
                                     context.seed(name), with_steps=False)))
    curves = {f"{name} (prompts x responses)": arm["curves"]["outcome"] for name, arm in arms.items()}
    diverse, deep = list(arms.values())[0], list(arms.values())[-1]
    sizes = reference["sizes"]
    four = sizes.index(4) if 4 in sizes[:-1] else max(len(sizes) - 2, 0)  # Best-of-4, or the largest N below N_max
    verdict = trend.gap_grows_verdict(
        "at equal data size, more prompts beat more responses per prompt, and the gap grows with N",
        [diverse["curves"]["outcome"][four], diverse["curves"]["outcome"][-1]],
        [deep["curves"]["outcome"][four], deep["curves"]["outcome"][-1]],
        [sizes[four], sizes[-1]], reference["prompts"])
    columns, rows = _table(reference, curves)
    return StudyResult(
        "RM data: more prompts vs more responses per prompt", f"{PAPER}, section 4.3.1", columns, rows,
        "N (candidates per prompt)", "Best-of-N accuracy",
        {"pass@N": (sizes, reference["pass@N"]), "random": (sizes, reference["random"]),
         **{name: (sizes, curve) for name, curve in curves.items()}},
        [verdict], _notes(context, reference) + [f"Each arm trains on {recipe.rm_data_size} labelled responses."],
        {"reference": reference, **arms})


# --- prm-vs-orm -----------------------------------------------------------------------------------


def run_prm_vs_orm(context: StudyContext) -> StudyResult:
    from megatron_rlhf.studies.math_candidates import labelled_records

    recipe = context.recipe
    _, train = math_split(recipe)
    model = base_model(context.shared_dir, recipe)
    reference = _bon_reference(context)
    per_prompt = max(recipe.rm_data_responses_per_prompt)
    problems = train[: recipe.rm_data_size // per_prompt]
    seed = context.seed("data")  # both arms see the same candidates, with outcome or step labels
    orm = context.arm("orm", lambda arm_dir: train_and_evaluate(
        context, arm_dir, "orm", model, "reward",
        labelled_records(problems, per_prompt, recipe.candidate_correct_rate, seed, with_steps=False)))
    prm = context.arm("prm", lambda arm_dir: train_and_evaluate(
        context, arm_dir, "prm", model, "prm",
        labelled_records(problems, per_prompt, recipe.candidate_correct_rate, seed, with_steps=True),
        aggregates=PRM_AGGREGATES))
    sizes = reference["sizes"]
    curves = {"ORM": orm["curves"]["outcome"], **{f"PRM ({agg})": prm["curves"][agg] for agg in PRM_AGGREGATES}}
    count = reference["prompts"]
    verdicts = [
        trend.ranking_verdict(f"in math, the PRM (last step) beats the ORM at Best-of-{sizes[-1]}",
                              ("PRM last", curves["PRM (last)"][-1]), ("ORM", curves["ORM"][-1]), count),
        trend.ranking_verdict(f"a trained ORM beats random choice at Best-of-{sizes[-1]}",
                              ("ORM", curves["ORM"][-1]), ("random", reference["random"][-1]), count),
    ]
    columns, rows = _table(reference, curves)
    return StudyResult(
        "Best-of-N: PRM (each aggregate) vs ORM vs random vs pass@N", f"{PAPER}, section 4.3 (process supervision)",
        columns, rows, "N (candidates per prompt)", "Best-of-N accuracy",
        {"pass@N": (sizes, reference["pass@N"]), "random": (sizes, reference["random"]),
         **{name: (sizes, curve) for name, curve in curves.items()}},
        verdicts, _notes(context, reference) + [
            f"ORM and PRM train on the same {len(problems) * per_prompt} candidates ({per_prompt} per prompt), "
            "with outcome or step labels."], {"reference": reference, "orm": orm, "prm": prm})


# --- rm-size --------------------------------------------------------------------------------------


def run_rm_size(context: StudyContext) -> StudyResult:
    from megatron_rlhf.studies.math_candidates import labelled_records

    recipe = context.recipe
    _, train = math_split(recipe)
    reference = _bon_reference(context)
    per_prompt = max(recipe.rm_data_responses_per_prompt)
    records = labelled_records(train[: recipe.rm_data_size // per_prompt], per_prompt, recipe.candidate_correct_rate,
                               context.seed("data"), with_steps=False)
    arms = {}
    for size in recipe.model_sizes:
        model = base_model(context.shared_dir, recipe, size)
        arms[size] = context.arm(f"hidden{size}", lambda arm_dir, size=size, model=model: train_and_evaluate(
            context, arm_dir, f"hidden{size}", model, "reward", records))
    sizes = reference["sizes"]
    hidden = list(arms)
    final = [arms[size]["curves"]["outcome"][-1] for size in hidden]
    verdict = trend.increases_verdict(f"larger reward models give (modest) Best-of-{sizes[-1]} gains",
                                      hidden, final, reference["prompts"])
    columns = ["hidden size", *(f"Best-of-{n}" for n in sizes)]
    rows = [[size, *arms[size]["curves"]["outcome"]] for size in hidden]
    rows += [["pass@N", *reference["pass@N"]], ["random", *reference["random"]]]
    return StudyResult(
        "RM size: Best-of-N accuracy by reward-model size", f"{PAPER}, section 4.3 (model scaling)", columns, rows,
        "reward-model hidden size", f"Best-of-{sizes[-1]} accuracy",
        {f"Best-of-{sizes[-1]}": (hidden, final),
         "random": (hidden, [reference["random"][-1]] * len(hidden)),
         "pass@N": (hidden, [reference["pass@N"][-1]] * len(hidden))},
        [verdict], _notes(context, reference) + ["Sizes differ in hidden size only (same layers, data and steps)."],
        {"reference": reference, **{str(size): arm for size, arm in arms.items()}})


STUDIES = (
    Study("rm-data", "reward model trained on more prompts vs more responses per prompt (Best-of-N)", run_rm_data,
          False),
    Study("prm-vs-orm", "Best-of-N of a PRM (each aggregate) vs an ORM vs random vs pass@N", run_prm_vs_orm, False),
    Study("rm-size", "Best-of-N accuracy of reward models of two or three sizes", run_rm_size, False),
)
