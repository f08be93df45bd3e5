"""Arguments of `megatron-rlhf score` (argparse only: building the CLI parser imports nothing else)."""

from __future__ import annotations

import argparse

from megatron_rlhf.cli_args import positive_int


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="IN.jsonl", help="samples to score")
    parser.add_argument("--output", required=True, metavar="OUT.jsonl", help="where to write one verdict per sample")
    parser.add_argument(
        "--config", default=None, metavar="REWARDS.yaml",
        help="reward sources and domain routes (default: one verifier per verifiable domain)",
    )
    parser.add_argument(
        "--chunk-size", type=positive_int, default=256, metavar="N", help="samples scored per router call (default: 256)"
    )
