"""`megatron-rlhf train-rm --config cfg.yaml`: train an ORM or PRM from a YAML recipe.

The recipe's format and the job are in :mod:`megatron_rlhf.trainer.reward_model_run`
(:func:`~megatron_rlhf.trainer.reward_model_run.load_train_rm_config`,
:func:`~megatron_rlhf.trainer.reward_model_run.train_reward_model`). Prints
``pairwise_accuracy=<v> auc=<v> step_auc=<v>`` last (global rank 0 only).
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="YAML", help="train-rm recipe (see module doc)")
    parser.add_argument(
        "--nproc", type=int, default=None, metavar="N",
        help="local processes to start when not under torchrun (default: TP * PP * data_parallel; "
        "ignored under torchrun, whose WORLD_SIZE rules)",
    )


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.parallel.launch import already_launched
    from megatron_rlhf.trainer.reward_model_run import load_train_rm_config, train_reward_model

    config = load_train_rm_config(args.config)
    metrics = train_reward_model(config, args.nproc)
    if not already_launched() or int(os.environ["RANK"]) == 0:
        print(f"wrote {config.role} checkpoint to {metrics['checkpoint']}")
        print(" ".join(f"{name}={metrics.get(name)}" for name in ("pairwise_accuracy", "auc", "step_auc")))
    return 0
