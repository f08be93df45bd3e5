"""`megatron-rlhf train-rl --config run.yaml`: the RL job from a YAML file.

The YAML maps onto :class:`~megatron_rlhf.trainer.rl_config.RLConfig` (unknown keys are errors
that name the key path). ``preset: grpo | ppo`` picks the algorithm defaults, which an
``algorithm:`` mapping then overrides field by field; ``--algo`` on the command line replaces
the preset. Running the same command again resumes from the newest complete checkpoint.

Example::

    policy_dir: out/sft
    out_dir: out/rl
    prompt_files: [data/prompts.jsonl]
    preset: grpo
    algorithm: {kl_coef: 0.005, reward_shrink_alpha: 0.5}
    steps: 100
    prompts_per_step: 32
    n: 8
    actor: {world_size: 2, parallel: {tensor_parallel: 2}}
    actor_optimizer: {lr: 1.0e-6}
    update: {ppo_epochs: 1, num_minibatches: 4, micro_batch_size: 4}
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def rl_config_from_mapping(data: Any, where: str, algo: str | None = None):
    from megatron_rlhf.rewards.reward_config import dataclass_from_mapping
    from megatron_rlhf.trainer.rl_config import ALGORITHMS, RLConfig, grpo_algorithm, ppo_algorithm

    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    preset = algo or data.pop("preset", "grpo")
    data.pop("preset", None)
    if preset not in ALGORITHMS:
        raise ValueError(f"{where}: preset/--algo {preset!r} (choose {ALGORITHMS})")
    overrides = data.pop("algorithm", {}) or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}.algorithm: expected a mapping of AlgorithmConfig fields")
    try:
        algorithm = (grpo_algorithm if preset == "grpo" else ppo_algorithm)(**overrides)
    except TypeError as error:
        raise ValueError(f"{where}.algorithm: {error}") from None
    return dataclass_from_mapping(RLConfig, {**data, "algorithm": algorithm}, where)


def load_rl_config(path: str | Path, algo: str | None = None):
    from megatron_rlhf.config.recipe import load_recipe

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RL config file not found: {path}")
    data = load_recipe(path)  # a recipe's `base:` files merged in, key by key
    return rl_config_from_mapping(data, str(path), algo)


def add_train_rl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="YAML", help="RL run configuration (see the module doc)")
    parser.add_argument("--algo", choices=("grpo", "ppo"), default=None, help="algorithm preset (overrides the file's)")


def run_train_rl(args: argparse.Namespace) -> int:
    from megatron_rlhf.trainer.rl_loop import run_rl

    result = run_rl(load_rl_config(args.config, args.algo))
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from is not None else ""
    print(f"policy={result.policy_dir} metrics={result.metrics_file} steps_run={result.steps_run}{resumed}")
    return 0
