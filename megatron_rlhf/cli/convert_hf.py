"""`megatron-rlhf convert-hf`: a Hugging Face model to a Megatron checkpoint at a given TP/PP/EP."""

from __future__ import annotations

import argparse

from megatron_rlhf.cli import EXIT_OK
from megatron_rlhf.cli.args import add_overwrite_argument, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory")
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="where to write the Megatron checkpoint"
    )
    parser.add_argument("--tp", type=positive_int, default=1, metavar="N", help="tensor parallel")
    parser.add_argument(
        "--pp", type=positive_int, default=1, metavar="M", help="pipeline parallel"
    )
    parser.add_argument(
        "--ep", type=positive_int, default=1, metavar="E", help="expert parallel (MoE models)"
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.checkpoint.convert import hf_to_megatron

    hf_to_megatron(
        args.hf,
        args.out,
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        expert_parallel=args.ep,
        overwrite=args.overwrite,
    )
    print(f"wrote Megatron checkpoint (TP={args.tp}, PP={args.pp}, EP={args.ep}) to {args.out}")
    return EXIT_OK
