"""`megatron-rlhf score`: score a JSONL file of samples with the reward verifiers / router.

The body is :func:`megatron_rlhf.rewards.score_file.run_score`, after the pre-flight checks of
:func:`megatron_rlhf.preflight.score.preflight_score`. Prints
``scored=<n> passed=<n> failed=<n> errors=<n>`` last.
"""

from __future__ import annotations

import argparse

from megatron_rlhf.cli.args import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="IN.jsonl", help="samples to score")
    parser.add_argument("--output", required=True, metavar="OUT.jsonl", help="where to write one verdict per sample")
    parser.add_argument(
        "--config", default=None, metavar="REWARDS.yaml",
        help="reward sources and domain routes (default: one verifier per verifiable domain)",
    )
    parser.add_argument(
        "--chunk-size", type=positive_int, default=256, metavar="N", help="samples scored per router call (default: 256)"
    )


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.preflight.score import preflight_score
    from megatron_rlhf.rewards.score_file import run_score

    return run_score(args.input, args.output, preflight_score(args.input, args.output, args.config), args.chunk_size)
