"""`megatron-rlhf train-sft`: supervised fine-tuning on chat JSONL at any TP/PP/DP.

The arguments become an :class:`~megatron_rlhf.trainer.sft_run.SFTRunConfig` (a bad value is a
user error naming it) for :func:`~megatron_rlhf.trainer.sft_run.run_sft`, the job. Prints the
output paths and the losses last (global rank 0 only). `train-genrm` reuses these arguments.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from megatron_rlhf.cli.args import non_negative_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megatron-rlhf train-sft` (imports nothing heavy)."""
    add = parser.add_argument
    add("--hf", required=True, metavar="DIR", help="starting Hugging Face model (with a chat template)")
    add("--data", required=True, metavar="FILE",
        help="chat JSONL: {messages: [...]} or {prompt, response}")
    add("--out", required=True, metavar="DIR", help="writes checkpoint/, hf/ and sft_report.json here")
    add("--valid", default=None, metavar="FILE", help="held-out chat JSONL for the validation loss")
    add("--valid-fraction", type=non_negative_float, default=0.0, metavar="F",
        help="hold out this share of --data when --valid is not given (default: 0, no validation)")
    add("--tp", type=positive_int, default=1, metavar="N", help="tensor parallel (default: 1)")
    add("--pp", type=positive_int, default=1, metavar="M", help="pipeline parallel (default: 1)")
    add("--nproc", type=positive_int, default=None, metavar="P",
        help="processes = TP x PP x DP (default: TP x PP; under torchrun: WORLD_SIZE)")
    add("--epochs", type=positive_int, default=1, help="passes over the data (default: 1)")
    add("--global-batch-size", type=positive_int, default=8, metavar="B",
        help="conversations per optimizer step over all DP ranks (default: 8)")
    add("--micro-batch-size", type=positive_int, default=1, metavar="B",
        help="conversations per microbatch on one DP rank (default: 1)")
    add("--packing", action="store_true",
        help="pack each microbatch's conversations into one row without padding (exact: the same loss "
             "and gradients as padded rows)")
    add("--max-tokens-per-microbatch", type=int, default=0, metavar="T",
        help="with --packing: tokens per packed microbatch on one DP rank instead of --micro-batch-size "
             "conversations (default: 0, off)")
    add("--max-length", type=positive_int, default=None, metavar="T",
        help="tokens kept per conversation (default: the model's max positions)")
    add("--lr", type=non_negative_float, default=1e-5, help="peak learning rate (default: 1e-5)")
    add("--min-lr", type=non_negative_float, default=0.0, help="final learning rate (default: 0)")
    add("--lr-warmup-steps", type=int, default=0, metavar="N", help="linear warmup steps (default: 0)")
    add("--lr-decay-style", choices=("constant", "linear", "cosine"), default="cosine",
        help="decay from --lr to --min-lr over the run (default: cosine)")
    add("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay (default: 0)")
    add("--clip-grad", type=non_negative_float, default=1.0,
        help="gradient-norm clip, 0 off (default: 1)")
    add("--adam-eps", type=non_negative_float, default=1e-8, help="Adam epsilon (default: 1e-8)")
    add("--seed", type=int, default=0, help="seed of the shuffle and the initialisation (default: 0)")
    add("--eval-interval", type=int, default=0, metavar="N",
        help="validate every N steps (default: 0, before training and after each epoch)")
    add("--log-interval", type=positive_int, default=10, metavar="N",
        help="log every N steps (default: 10)")
    add("--params-dtype", choices=("float32", "bfloat16", "float16"), default=None,
        help="training weight dtype (default: the dtype of the HF weights)")
    add("--precision", choices=("fp32", "bf16", "fp8"), default=None,
        help="training precision: fp32, bf16 (Megatron mixed precision) or fp8 (Transformer Engine, "
             "delayed recipe); overrides --params-dtype (default: --params-dtype decides)")
    add("--no-progress", action="store_true", help="no progress bar (log lines only)")
    add("--no-checkpoint", action="store_true", help="do not write the Megatron checkpoint")
    add("--gpu", choices=("h100", "h200"), default=None,
        help="GPU the planner checks the layout against before any rank starts (default on GPUs: h100)")
    add("--allow-unfit", action="store_true",
        help="start even when the planner says the layout does not fit GPU memory")
    add("--overwrite", action="store_true", help="replace --out if it exists and is not empty")


def sft_run_config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~megatron_rlhf.trainer.sft_run.SFTRunConfig` the train-sft arguments describe."""
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.parallel.launch import already_launched
    from megatron_rlhf.training.megatron_step import OptimizerSettings
    from megatron_rlhf.trainer.sft import SFTConfig
    from megatron_rlhf.trainer.sft_run import SFTRunConfig

    from megatron_rlhf.config.errors import UserError

    budget = getattr(args, "max_tokens_per_microbatch", 0)
    if budget < 0 or (budget and not getattr(args, "packing", False)):
        raise UserError(f"--max-tokens-per-microbatch={budget}: must be >= 0 and needs --packing")
    nproc = args.nproc or (int(os.environ["WORLD_SIZE"]) if already_launched() else None)
    return SFTRunConfig(
        hf_dir=args.hf,
        train_path=args.data,
        out_dir=args.out,
        validation_path=args.valid,
        validation_fraction=args.valid_fraction,
        parallel=ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp),
        num_processes=nproc,
        sft=SFTConfig(
            epochs=args.epochs,
            global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            packing=getattr(args, "packing", False),
            max_tokens_per_microbatch=getattr(args, "max_tokens_per_microbatch", 0),
            max_length=args.max_length,
            seed=args.seed,
            eval_interval=args.eval_interval,
            log_interval=args.log_interval,
            progress_bar=not args.no_progress,
        ),
        optimizer=OptimizerSettings(
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            lr_warmup_steps=args.lr_warmup_steps,
            lr_decay_style=args.lr_decay_style,
        ),
        params_dtype=args.params_dtype,
        precision=_precision_from_args(getattr(args, "precision", None)),
        fit_check=_fit_check_from_args(args),
        save_checkpoint=not args.no_checkpoint,
        overwrite=args.overwrite,
    )


def _fit_check_from_args(args: argparse.Namespace) -> Any:
    from megatron_rlhf.planning.fit_check import FitCheckConfig

    return FitCheckConfig(gpu=getattr(args, "gpu", None), allow_unfit=getattr(args, "allow_unfit", False))


def _precision_from_args(mode: str | None) -> Any:
    from megatron_rlhf.config.precision import PrecisionConfig

    return None if mode is None else PrecisionConfig(mode=mode)


def run(args: argparse.Namespace) -> int:
    """`megatron-rlhf train-sft`: prints the output paths and the validation losses last."""
    from megatron_rlhf.config.errors import UserError
    from megatron_rlhf.trainer.sft_run import run_sft

    try:
        config = sft_run_config_from_args(args)
    except ValueError as error:  # every value comes from the command line
        raise UserError(f"arguments: {error}") from None
    print_sft_result(run_sft(config), args)
    return 0


def print_sft_result(report: Any, args: argparse.Namespace) -> None:
    """Three summary lines on stdout (global rank 0 only); the last holds the losses."""
    if int(os.environ.get("RANK", "0")) == 0:
        where = [f"{args.out}/hf"] + ([] if args.no_checkpoint else [f"{args.out}/checkpoint"])
        print(f"wrote {' and '.join(where)} and {args.out}/sft_report.json")
        print(
            f"steps={len(report.steps)} skipped={report.skipped_steps} "
            f"truncated={report.num_truncated} dropped_without_targets={report.num_without_targets}"
        )
        last = report.steps[-1].loss if report.steps else float("nan")
        print(
            f"train_loss={last:.6f} initial_validation_loss={report.initial_validation_loss} "
            f"final_validation_loss={report.final_validation_loss}"
        )
