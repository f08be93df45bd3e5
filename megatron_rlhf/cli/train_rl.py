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
    """:class:`RLConfig` from a parsed YAML document, typed strictly (``config.typed_load``);
    ConfigError naming ``where`` and the key path."""
    import dataclasses

    from megatron_rlhf.algorithms import AlgorithmConfig
    from megatron_rlhf.config.errors import ConfigError
    from megatron_rlhf.config.typed_load import at, dataclass_from_mapping
    from megatron_rlhf.trainer.rl_config import ALGORITHMS, RLConfig, grpo_algorithm, ppo_algorithm

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    preset = algo or data.pop("preset", "grpo")
    data.pop("preset", None)
    if preset not in ALGORITHMS:
        raise ConfigError(f"{where}: preset: {preset!r} is not an algorithm preset (choose {ALGORITHMS})")
    overrides = data.pop("algorithm", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{at(where, 'algorithm')}: expected a mapping of AlgorithmConfig fields, got {overrides!r}")
    defaults = (grpo_algorithm if preset == "grpo" else ppo_algorithm)()
    settings = {field.name: getattr(defaults, field.name) for field in dataclasses.fields(defaults) if field.init}
    algorithm = dataclass_from_mapping(AlgorithmConfig, {**settings, **overrides}, at(where, "algorithm"))
    return RLConfig.from_mapping({**data, "algorithm": algorithm}, where)  # reads reward_config, types curriculum


def load_rl_config(path: str | Path, algo: str | None = None):
    from megatron_rlhf.config.errors import MissingInput
    from megatron_rlhf.config.recipe import load_recipe

    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"RL config file not found: {path}")
    data = load_recipe(path)  # a recipe's `base:` files merged in, key by key
    return rl_config_from_mapping(data, str(path), algo)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="YAML", help="RL run configuration (see the module doc)")
    parser.add_argument("--algo", choices=("grpo", "ppo"), default=None, help="algorithm preset (overrides the file's)")


def run(args: argparse.Namespace) -> int:
    """Load and type the config, run the pre-flight checks (every file, route, checkpoint and
    length, before any process starts), then the job. A run that fails leaves no empty
    ``out_dir`` behind."""
    from megatron_rlhf.preflight.rl import preflight_rl

    config = load_rl_config(args.config, args.algo)
    preflight_rl(config, args.config)
    from megatron_rlhf.trainer.rl_loop import run_rl

    out_dir = Path(config.out_dir)
    existed = out_dir.exists()
    try:
        result = run_rl(config)
    except BaseException:
        if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from is not None else ""
    print(f"policy={result.policy_dir} metrics={result.metrics_file} steps_run={result.steps_run}{resumed}")
    return 0
