"""`megatron-rlhf demo`: the main job on CPU (body: :func:`megatron_rlhf.demo.run_demo_pipeline`).

Prints ``math_accuracy_sft=<v> math_accuracy_rl=<v> report=<path>`` last.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", metavar="DIR", help="output folder (default: outputs/demo)")
    parser.add_argument("--algo", choices=("grpo", "ppo"), default="grpo", help="RL algorithm (default: grpo)")
    from megatron_rlhf.cli.args import positive_int
    from megatron_rlhf.demo import QUICK, DemoConfig

    parser.add_argument("--rl-steps", type=positive_int, default=None, metavar="N",
                        help=f"RL steps (default: {DemoConfig.rl_steps}; {QUICK['rl_steps']} with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the pipeline runs, not that it learns")
    parser.add_argument("--with-genrm", action="store_true",
                        help="also train a generative reward model (GenRM) judge and reward general chat in RL with "
                        "its verdict against the reward model's Best-of-N reference, plus the reward model: the "
                        "verifiers + GenRM + BT RM hybrid reward of the ByteDance Seed study")
    parser.add_argument("--restart", action="store_true", help="delete the output folder first")


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.demo import QUICK, DemoConfig, run_demo_pipeline

    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.rl_steps is not None:
        overrides["rl_steps"] = args.rl_steps
    config = DemoConfig(out_dir=args.out, algo=args.algo, seed=args.seed, with_genrm=args.with_genrm, **overrides)
    if args.restart and Path(args.out).exists():
        shutil.rmtree(args.out)
    summary = run_demo_pipeline(config)
    print(f"math_accuracy_sft={summary['math_accuracy_sft']:.3f} math_accuracy_rl={summary['math_accuracy_rl']:.3f} "
          f"report={summary['report']}")
    return 0
