"""`megatron-rlhf conversion-demo`: the conversion check on CPU (body: :mod:`megatron_rlhf.conversion_demo`)."""

from __future__ import annotations

import argparse

from megatron_rlhf.cli.args import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="outputs/conversion-demo",
        metavar="DIR",
        help="where it writes its models and checkpoints (default: outputs/conversion-demo)",
    )
    parser.add_argument(
        "--arch", default="llama", help="architecture of the tiny model (default: llama)"
    )
    parser.add_argument("--tp", type=positive_int, default=2, metavar="N", help="default: 2")
    parser.add_argument("--pp", type=positive_int, default=2, metavar="M", help="default: 2")


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.conversion_demo import run_conversion_demo

    return int(
        run_conversion_demo(
            args.out, architecture=args.arch, tensor_parallel=args.tp, pipeline_parallel=args.pp
        )
    )
