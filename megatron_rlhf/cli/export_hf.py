"""`megatron-rlhf export-hf`: a Megatron checkpoint (any TP/PP/EP) to a Hugging Face model."""

from __future__ import annotations

import argparse

from megatron_rlhf.cli import EXIT_OK
from megatron_rlhf.cli.args import add_overwrite_argument, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt", required=True, metavar="DIR", help="Megatron checkpoint directory (any TP/PP)"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="where to write the Hugging Face model"
    )
    parser.add_argument(
        "--tp", type=positive_int, default=None, metavar="N",
        help="load at this tensor-parallel size instead of the saved one (resharding)",
    )
    parser.add_argument(
        "--pp", type=positive_int, default=None, metavar="M",
        help="load at this pipeline-parallel size instead of the saved one (resharding)",
    )
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.checkpoint.convert import megatron_to_hf

    megatron_to_hf(
        args.ckpt,
        args.out,
        tensor_parallel=args.tp,
        pipeline_parallel=args.pp,
        overwrite=args.overwrite,
    )
    print(f"wrote Hugging Face model to {args.out}")
    return EXIT_OK
