"""`megatron-rlhf check-weight-sync`: train a step, sync the weights into vLLM, compare log-probs.

The body is :func:`megatron_rlhf.trainer.weight_sync_check.check_weight_sync`. Prints
``max_abs_logprob_diff=<v> sync_seconds=<v>`` last; exits 1 above the tolerance.
"""

from __future__ import annotations

import argparse
import sys

from megatron_rlhf.cli import EXIT_OK, EXIT_VERIFICATION_FAILED
from megatron_rlhf.cli.args import positive_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory")
    parser.add_argument("--tp", type=positive_int, default=1, metavar="N", help="trainer TP")
    parser.add_argument("--pp", type=positive_int, default=1, metavar="M", help="trainer PP")
    parser.add_argument("--ep", type=positive_int, default=1, metavar="E", help="trainer EP")
    parser.add_argument(
        "--engine-tp", type=positive_int, default=1, metavar="N", help="vLLM's own TP size"
    )
    parser.add_argument(
        "--tolerance", type=positive_float, default=None, metavar="T",
        help="largest allowed |log-prob difference| (default: 1e-3)",
    )


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.trainer.weight_sync_check import (
        DEFAULT_TOLERANCE,
        WeightSyncCheckFailed,
        check_weight_sync,
    )

    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE
    try:
        result = check_weight_sync(
            args.hf, args.tp, args.pp, args.ep, args.engine_tp, tolerance=tolerance
        )
    except WeightSyncCheckFailed as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        result, code = failure.result, EXIT_VERIFICATION_FAILED
    else:
        code = EXIT_OK
    print(
        f"mean_importance_ratio={result.mean_importance_ratio:.6f} "
        f"stale_logprob_diff={result.stale_logprob_diff:.3e} tokens={result.tokens_compared}"
    )
    print(f"max_abs_logprob_diff={result.max_abs_logprob_diff} sync_seconds={result.sync_seconds}")
    return code
