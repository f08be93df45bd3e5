"""The stages of `megatron-rlhf demo` (see :mod:`megatron_rlhf.demo`), one function each.

Every stage takes the demo config, the output folder and the results of the earlier stages, calls
the library (the same functions `train-sft`, `train-rm`, `train-rl` and `eval-bon` use), and
returns a JSON-able summary. Megatron work runs in spawned processes (SFT, reward model,
reward scoring) or Ray workers (RL), so this process never initialises torch.distributed and can
run vLLM engines for sampling and evaluation itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)
DOMAINS = ("math", "code", "general")


def _paths(out: Path) -> dict[str, Path]:
    data = out / "data"
    return {
        "base": out / "base_model", "data": data, "sft": out / "sft", "rm": out / "reward_model",
        "rl": out / "rl", "prompts_rl": data / "prompts_rl.jsonl", "reward_yaml": out / "rl_reward.yaml",
        "pre_ppo_samples": data / "pre_ppo_samples.jsonl",
    }


# --- 1. prepare ---------------------------------------------------------------------------------


def stage_prepare(config, out: Path, results: dict) -> dict[str, Any]:
    from megatron_rlhf.data.synthetic_tasks import CodeDifficulty, DemoDatasetSizes, MathDifficulty, write_demo_datasets
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    paths = _paths(out)
    tokenizer = train_tiny_tokenizer(config.vocab_size - 12, seed=config.seed)
    heads = max(config.hidden_size // 32, 1)
    make_tiny_hf_model("llama", paths["base"], seed=config.seed + 1, vocab_size=config.vocab_size, tokenizer=tokenizer,
                       hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       intermediate_size=3 * config.hidden_size, max_position_embeddings=512)
    sizes = DemoDatasetSizes(
        sft_per_domain=config.sft_per_domain, sft_eval_per_domain=16, prompts_per_domain=config.prompts_per_domain,
        eval_prompts_per_domain=config.eval_prompts_per_domain, preference_pairs=256, preference_eval_pairs=64,
        math=MathDifficulty(operand_min=1, operand_max=5, min_operations=1, max_operations=1, multiplication=False),
        code=CodeDifficulty(constant_max=200),
    )
    files = write_demo_datasets(paths["data"], seed=config.seed, sizes=sizes)
    noisy = inject_wrong_solutions(files.sft_train, files.reasoning_labelled, config.sft_noise, config.seed)
    return {"base_model": str(paths["base"]), "sft_wrong_solutions": noisy,
            **{name: str(path) for name, path in vars(files).items()}}


def inject_wrong_solutions(sft_path: Path, labelled_path: Path, rate: float, seed: int) -> int:
    """Replace the assistant answer of a ``rate`` share of the math and code SFT conversations by
    the task's wrong solution (from the labelled file), as noisy human- or model-written SFT data
    has: the SFT policy then answers wrongly part of the time, which RL with verifiable rewards
    can correct. Deterministic in ``seed``; returns the number of conversations changed."""
    import random

    from megatron_rlhf.data.jsonl import write_jsonl

    wrong = {}
    for line in labelled_path.read_text().splitlines():
        row = json.loads(line)
        if row["label"] == 0:
            wrong[row["prompt"]] = row["response"]
    rng = random.Random(f"sft-noise:{seed}")
    rows, changed = [], 0
    for line in sft_path.read_text().splitlines():
        row = json.loads(line)
        prompt = row["messages"][0]["content"]
        if row.get("domain") in ("math", "code") and prompt in wrong and rng.random() < rate:
            row["messages"][-1]["content"] = wrong[prompt]
            changed += 1
        rows.append(row)
    write_jsonl(sft_path, rows)
    return changed


# --- 2. SFT -------------------------------------------------------------------------------------


def stage_sft(config, out: Path, results: dict) -> dict[str, Any]:
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.trainer.sft import SFTConfig
    from megatron_rlhf.trainer.sft_run import SFTRunConfig, run_sft

    prepared = results["prepare"]
    optimizer = OptimizerSettings(lr=config.sft_lr, min_lr=config.sft_lr / 10, lr_warmup_steps=10,
                                  lr_decay_style="cosine", clip_grad=1.0)
    sft = SFTConfig(epochs=config.sft_epochs, global_batch_size=config.sft_batch_size,
                    micro_batch_size=config.sft_batch_size, max_length=192, seed=config.seed, log_interval=25)
    report = run_sft(SFTRunConfig(hf_dir=prepared["base_model"], train_path=prepared["sft_train"],
                                  validation_path=prepared["sft_eval"], out_dir=str(_paths(out)["sft"]), sft=sft,
                                  optimizer=optimizer, save_checkpoint=False, overwrite=True))
    return {"policy": str(_paths(out)["sft"] / "hf"), "steps": len(report.steps),
            "initial_validation_loss": report.initial_validation_loss,
            "final_validation_loss": report.final_validation_loss}


# --- 3. reward model ------------------------------------------------------------------------------


def stage_reward_model(config, out: Path, results: dict) -> dict[str, Any]:
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.data.reward_data import RewardTokenization
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.trainer.reward_model import RewardTrainingConfig
    from megatron_rlhf.trainer.reward_model_run import TrainRMConfig, train_reward_model

    prepared = results["prepare"]
    rm_dir = _paths(out)["rm"]
    if rm_dir.exists():  # a demo killed mid-stage: train-rm refuses a non-empty output
        import shutil

        shutil.rmtree(rm_dir)
    metrics = train_reward_model(TrainRMConfig(
        model=results["sft"]["policy"], role="reward",
        train_files=(prepared["preference_train"], prepared["reasoning_labelled"]),
        validation_files=(prepared["preference_eval"],), output=str(rm_dir), steps=config.rm_steps,
        seed=config.seed + 2, parallel=ParallelConfig(), tokenization=RewardTokenization(max_length=256),
        training=RewardTrainingConfig(pairs_per_microbatch=8, responses_per_microbatch=8),
        optimizer=OptimizerSettings(lr=1e-3, min_lr=1e-4, lr_decay_style="cosine", lr_decay_steps=config.rm_steps),
    ))
    return {"checkpoint": str(rm_dir / "checkpoint"), **{k: v for k, v in metrics.items() if _plain(v)}}


def _rm_score_worker(ckpt_dir: str, samples: list) -> list[float | None]:
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.rewards.learned import load_learned_reward_source

    initialize_parallel(ParallelConfig())
    source = load_learned_reward_source(ckpt_dir, ParallelConfig())
    return [result.reward for result in source.score(samples)]


class SpawnedRewardModel:
    """The trained reward model as a reward source, scoring in a fresh process per call."""

    name = "reward_model"

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = ckpt_dir

    def score(self, samples: Sequence[Any]) -> list[Any]:
        from megatron_rlhf.parallel.launch import run_distributed
        from megatron_rlhf.rewards.sample import RewardResult, RewardStatus, Verdict

        rewards = run_distributed(_rm_score_worker, 1, self.ckpt_dir, list(samples))[0] if samples else []
        return [RewardResult(reward, RewardStatus.SCORED, Verdict.OK) if reward is not None
                else RewardResult(None, RewardStatus.INFRA_ERROR, Verdict.SCORER_ERROR) for reward in rewards]

    def close(self) -> None:
        """Nothing held between calls."""


def _router(results: dict) -> Any:
    from megatron_rlhf.rewards.router import DomainRoute, HybridRewardRouter, RouterConfig
    from megatron_rlhf.rewards.verifiers.code_verifier import CodeVerifier, CodeVerifierConfig
    from megatron_rlhf.rewards.verifiers.math_verifier import MathVerifier, MathVerifierConfig

    routes = {"math": DomainRoute({"math": 1.0}), "code": DomainRoute({"code": 1.0}),
              "general": DomainRoute({"reward_model": 1.0})}
    sources = {"math": MathVerifier(MathVerifierConfig()), "code": CodeVerifier(CodeVerifierConfig()),
               "reward_model": SpawnedRewardModel(results["reward_model"]["checkpoint"])}
    return HybridRewardRouter(RouterConfig(domains=routes), sources)


# --- 4. Pre-PPO selection ---------------------------------------------------------------------------


def stage_pre_ppo(config, out: Path, results: dict) -> dict[str, Any]:
    from megatron_rlhf.data.jsonl import write_jsonl
    from megatron_rlhf.data.pre_ppo import PrePPOConfig, select_prompts
    from megatron_rlhf.data.prompts import load_prompt_dataset
    from megatron_rlhf.rewards.sample import RewardSample
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine
    from megatron_rlhf.config.sampling import SamplingSettings

    records, _ = load_prompt_dataset(results["prepare"]["prompts_train"])
    selection = PrePPOConfig(keep_fraction=config.pre_ppo_keep_fraction, samples_per_prompt=config.pre_ppo_samples,
                             chunk_size=max(len(records), 1))
    scored: list[dict[str, Any]] = []  # every prompt's responses and reward-model scores (None: unscored)
    engine_config = RolloutConfig(model_dir=results["sft"]["policy"], max_model_len=256, overlong_prompts="drop",
                                  seed=config.seed, weight_transfer_backend=None)
    reward_model = SpawnedRewardModel(results["reward_model"]["checkpoint"])
    with RolloutEngine(engine_config) as engine:
        def sample(prompts, n):
            batch = engine.generate([p.as_messages() for p in prompts],
                                    SamplingSettings(n=n, max_new_tokens=config.max_new_tokens, seed=config.seed))
            return [texts or [""] * n for texts in batch.texts_by_prompt(engine.tokenizer, len(prompts))]

        def score(prompts, responses):
            samples = [RewardSample(f"{p.id}:{k}", p.domain, p.text, text) for p, row in zip(prompts, responses)
                       for k, text in enumerate(row)]
            rewards = iter([r.reward for r in reward_model.score(samples)])
            rows = [[next(rewards) for _ in row] for row in responses]
            scored.extend({"id": p.id, "domain": p.domain, "responses": list(texts), "scores": values}
                          for p, texts, values in zip(prompts, responses, rows))
            return [[0.0 if value is None else value for value in values] for values in rows]

        result = select_prompts(records, sample, score, selection)
    path = _paths(out)["prompts_rl"]
    write_jsonl(path, (record.to_row() for record in result.merged))
    write_jsonl(_paths(out)["pre_ppo_samples"], scored)
    return {"prompts": str(path), "samples": str(_paths(out)["pre_ppo_samples"]), "candidates": len(records),
            "selected": len(result.selected), "merged": len(result.merged),
            "domains": {d: {"selected": s.selected, "mean_score": s.mean_score} for d, s in result.domains.items()}}


# --- 5/7. evaluation ---------------------------------------------------------------------------------


def _evaluate(config, results: dict, policy: str) -> dict[str, Any]:
    from megatron_rlhf.data.prompts import load_prompt_dataset
    from megatron_rlhf.evaluation.held_out import HeldOutEvalConfig, evaluate_policy

    records, _ = load_prompt_dataset(results["prepare"]["prompts_eval"])
    router = _router(results)
    try:
        evaluation = evaluate_policy(policy, records, router, HeldOutEvalConfig(
            samples_per_prompt=config.eval_samples, max_new_tokens=config.max_new_tokens, seed=config.seed + 3))
    finally:
        router.close()
    domains = {domain: vars(scores) for domain, scores in evaluation.domains.items()}
    return {"policy": policy, "domains": domains, "prompts_dropped": evaluation.prompts_dropped}


def stage_eval_sft(config, out: Path, results: dict) -> dict[str, Any]:
    return _evaluate(config, results, results["sft"]["policy"])


def stage_eval_rl(config, out: Path, results: dict) -> dict[str, Any]:
    return _evaluate(config, results, results["rl"]["policy"])


# --- 6. RL ---------------------------------------------------------------------------------------------


def stage_rl(config, out: Path, results: dict) -> dict[str, Any]:
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig
    from megatron_rlhf.data.curriculum import CurriculumConfig
    from megatron_rlhf.rewards.reward_config import load_reward_config
    from megatron_rlhf.trainer.rl_config import RLConfig, grpo_algorithm, ppo_algorithm
    from megatron_rlhf.demo_genrm import hybrid_reward
    from megatron_rlhf.trainer.rl_loop import run_rl

    paths = _paths(out)
    paths["reward_yaml"].write_text(json.dumps(hybrid_reward(config, results), indent=2))
    prompts = results["bon_reference"]["prompts"] if config.with_genrm else results["pre_ppo"]["prompts"]
    algorithm = ppo_algorithm() if config.algo == "ppo" else grpo_algorithm(reward_shrink_alpha=0.5)
    switch = max(1, round(config.rl_steps * config.curriculum_fraction))
    samples = config.prompts_per_step * config.n
    rl = RLConfig(
        policy_dir=results["sft"]["policy"], out_dir=str(paths["rl"]), prompt_files=(prompts,),
        algorithm=algorithm, steps=config.rl_steps, prompts_per_step=config.prompts_per_step, n=config.n,
        max_new_tokens=config.max_new_tokens, max_prompt_tokens=128,
        update=PPOUpdateConfig(ppo_epochs=1, num_minibatches=2, micro_batch_size=samples // 2),
        actor_optimizer=OptimizerSettings(lr=config.rl_lr, clip_grad=1.0),
        critic_optimizer=OptimizerSettings(lr=1e-3, clip_grad=1.0),
        reward_config=load_reward_config(paths["reward_yaml"]),
        curriculum=CurriculumConfig.first_then_all(("math", "code"), switch),
        checkpoint_every=10, seed=config.seed + 4,
    )
    result = run_rl(rl)
    return {"policy": result.policy_dir, "metrics": result.metrics_file, "steps_run": result.steps_run}


# --- 8. report -----------------------------------------------------------------------------------------


def stage_report(config, out: Path, results: dict) -> dict[str, Any]:
    from dataclasses import asdict

    from megatron_rlhf.demo_genrm import contributions_markdown, source_contributions
    from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl
    from megatron_rlhf.evaluation.report import write_report

    def accuracies(stage: str) -> dict[str, float]:
        domains = results[stage]["domains"]
        return {d: s["sampled_accuracy"] for d, s in domains.items() if d in ("math", "code")}

    evaluations = {"SFT": accuracies("eval_sft"), f"RL ({config.algo.upper()})": accuracies("eval_rl")}
    report = write_report(out, results["rl"]["metrics"], evaluations, {"demo": asdict(config)})
    sources = source_contributions(read_metrics_jsonl(results["rl"]["metrics"]))
    with open(report.markdown, "a") as markdown:
        markdown.write(contributions_markdown(sources))
    summary = {
        "report": str(report.markdown),
        "math_accuracy_sft": evaluations["SFT"].get("math", 0.0),
        "math_accuracy_rl": evaluations[f"RL ({config.algo.upper()})"].get("math", 0.0),
        "reward_sources": sources,
        "held_out": {stage: results[stage]["domains"] for stage in ("eval_sft", "eval_rl")},
        "stage_seconds": {name: results[name].get("seconds") for name in results},
    }
    return summary


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
