"""`megatron-rlhf train-genrm`: generative reward model training from labelled-records JSONL.

The train-sft options (:mod:`megatron_rlhf.cli.train_sft`), with ``--data`` / ``--valid``
holding labelled records, plus the judge's settings; the job is
:func:`megatron_rlhf.trainer.genrm.run_genrm`. Prints like train-sft.
"""

from __future__ import annotations

import argparse

from megatron_rlhf.cli.train_sft import add_arguments as add_train_sft_arguments
from megatron_rlhf.cli.train_sft import print_sft_result, sft_run_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`megatron-rlhf train-genrm`: the train-sft options, with --data/--valid as labelled records."""
    add_train_sft_arguments(parser)
    records = "labelled records JSONL: {prompt, response, label[, reference][, rationale]}"
    for action in parser._actions:  # same options as train-sft; --data/--valid hold records here
        if action.dest in ("data", "valid"):
            action.help = records + (" (held out)" if action.dest == "valid" else "")
    parser.add_argument(
        "--with-reference", action="store_true",
        help="show each record's reference / ground_truth answer to the judge",
    )
    parser.add_argument(
        "--verdict-format", choices=("binary", "score"), default="binary",
        help='binary: "Verdict: correct/incorrect" (labels 0/1); '
        'score: "Score: k/10" (labels in [0, 1])',
    )


def run(args: argparse.Namespace) -> int:
    """Train the judge from labelled-records JSONL; prints like train-sft."""
    from megatron_rlhf.config.errors import UserError
    from megatron_rlhf.trainer.genrm import GenRMDataConfig, run_genrm

    try:  # every value comes from the command line
        data = GenRMDataConfig(with_reference=args.with_reference, verdict_format=args.verdict_format)
        config = sft_run_config_from_args(args)
    except ValueError as error:
        raise UserError(f"arguments: {error}") from None
    print_sft_result(run_genrm(config, data), args)
    return 0
