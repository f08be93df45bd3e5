"""`megatron-rlhf verify`: a Megatron checkpoint's logits against its Hugging Face model's.

Prints ``max_abs_logit_diff=<value>`` last; exits 1 when it is above the tolerance.
"""

from __future__ import annotations

import argparse
import sys

from megatron_rlhf.cli import EXIT_OK, EXIT_VERIFICATION_FAILED
from megatron_rlhf.cli.args import positive_float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory")
    parser.add_argument(
        "--ckpt", required=True, metavar="DIR", help="Megatron checkpoint directory"
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=None,
        metavar="T",
        help="largest allowed |logit difference| (default: the library's, 1e-4 in fp32)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random probe tokens (default: 0)"
    )


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.checkpoint.verify import VerificationFailed, verify_checkpoint

    try:
        max_abs_logit_diff = verify_checkpoint(
            args.hf, args.ckpt, tolerance=args.tolerance, seed=args.seed
        )
    except VerificationFailed as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        print(f"max_abs_logit_diff={float(failure.max_abs_diff)}")
        return EXIT_VERIFICATION_FAILED
    print(f"max_abs_logit_diff={float(max_abs_logit_diff)}")
    return EXIT_OK
