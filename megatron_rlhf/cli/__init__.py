"""`megatron-rlhf`: the command-line entry point (also `python -m megatron_rlhf`).

Each subcommand turns its arguments into one call of a library function. Library modules are
imported inside the command that uses them, so `--help` and argument errors answer at once and
never import torch, Megatron-Core, vLLM or Ray.

Exit codes: 0 success; 1 `verify` found logits further apart than the tolerance; 2 a user error
(bad argument, missing file, invalid value: a :class:`~megatron_rlhf.config.errors.UserError`),
printed as `error: <message>` on stderr without a traceback (`--traceback` shows it). Every other
exception (``ValueError`` included) is a defect and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from typing import Callable, Sequence

from megatron_rlhf.cli_args import positive_float, positive_int
from megatron_rlhf.config.errors import UserError

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_USER_ERROR = 2

# Notices Megatron-Core prints on every machine without Transformer Engine or Apex (every CPU
# machine, by design). Hidden in this process and in the ranks it starts, which read PYTHONWARNINGS.
EXPECTED_NOTICES = ("Transformer Engine and Apex are not installed", "Apex is not installed")


# --- convert-hf ------------------------------------------------------------------------------


def add_convert_hf_arguments(parser: argparse.ArgumentParser) -> None:
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
    _add_overwrite_argument(parser)


def _add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists and is not empty"
    )


def run_convert_hf(args: argparse.Namespace) -> int:
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


# --- export-hf -------------------------------------------------------------------------------


def add_export_hf_arguments(parser: argparse.ArgumentParser) -> None:
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
    _add_overwrite_argument(parser)


def run_export_hf(args: argparse.Namespace) -> int:
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


# --- verify ----------------------------------------------------------------------------------


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_verify(args: argparse.Namespace) -> int:
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


# --- demo ------------------------------------------------------------------------------------


def add_conversion_demo_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_conversion_demo(args: argparse.Namespace) -> int:
    from megatron_rlhf.conversion_demo import run_conversion_demo

    return int(
        run_conversion_demo(
            args.out, architecture=args.arch, tensor_parallel=args.tp, pipeline_parallel=args.pp
        )
    )


# --- check-weight-sync -------------------------------------------------------------------------


def add_check_weight_sync_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_check_weight_sync(args: argparse.Namespace) -> int:
    from megatron_rlhf.rollout.sync_check import (
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


# --- score -----------------------------------------------------------------------------------


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_rlhf.rewards.score_arguments import add_score_arguments as add

    add(parser)


def run_score(args: argparse.Namespace) -> int:
    from megatron_rlhf.preflight.score import preflight_score
    from megatron_rlhf.rewards.score_file import run_score as run

    return run(args, preflight_score(args.input, args.output, args.config))


# --- parser and entry point ------------------------------------------------------------------

# name -> (one-line help, add_arguments, run)
COMMANDS: dict[
    str,
    tuple[
        str,
        Callable[[argparse.ArgumentParser], None],
        Callable[[argparse.Namespace], int],
    ],
] = {
    "convert-hf": (
        "convert a Hugging Face model to a Megatron checkpoint at a given TP/PP/EP",
        add_convert_hf_arguments,
        run_convert_hf,
    ),
    "export-hf": (
        "export a Megatron checkpoint (any TP/PP/EP) to a Hugging Face model",
        add_export_hf_arguments,
        run_export_hf,
    ),
    "verify": (
        "compare a Megatron checkpoint's logits with its Hugging Face model's; prints "
        "max_abs_logit_diff=<value> last and exits 1 above the tolerance",
        add_verify_arguments,
        run_verify,
    ),
    "check-weight-sync": (
        "load an HF model into Megatron at TP/PP, take an optimizer step, sync into vLLM, "
        "sample; prints max_abs_logprob_diff=<v> sync_seconds=<v> last, exits 1 above tolerance",
        add_check_weight_sync_arguments,
        run_check_weight_sync,
    ),
    "conversion-demo": (
        "conversion check on CPU: tiny model, HF -> Megatron (TP2 x PP2) -> HF, logits and bit-exact checks",
        add_conversion_demo_arguments,
        run_conversion_demo,
    ),
    "score": (
        "score a JSONL file of samples with the reward verifiers/router; prints "
        "scored=<n> passed=<n> failed=<n> errors=<n> last",
        add_score_arguments,
        run_score,
    ),
}


def _external(module: str, name: str) -> tuple[Callable, Callable]:
    """``(add_<name>_arguments, run_<name>)`` of a light ``*_cli`` module, imported on first use
    (those modules import only the standard library at the top)."""
    import importlib

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(module), f"add_{name}_arguments")(parser)

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), f"run_{name}")(args)

    return add_arguments, run


EXTERNAL_COMMANDS = {
    "demo": ("the main job on CPU: tiny model, synthetic math/code/chat data, SFT, reward model, Pre-PPO "
             "selection, GRPO (or PPO) with the hybrid reward and vLLM rollouts, held-out evaluation, report",
             "megatron_rlhf.demo", "demo"),
    "train-sft": ("supervised fine-tuning on chat JSONL (loss on assistant tokens) at any TP/PP/DP",
                  "megatron_rlhf.trainer.sft_cli", "train_sft"),
    "train-genrm": ("generative reward model training: SFT of the judge's verdicts, with or without the reference answer",
                    "megatron_rlhf.trainer.genrm", "train_genrm"),
    "train-rm": ("reward-model training (ORM: Bradley-Terry + BCE; PRM: per-step BCE) at any TP/PP/DP, "
                 "SPMD under torchrun", "megatron_rlhf.trainer.reward_model_cli", "train_rm"),
    "label-steps": ("Math-Shepherd step labels: roll out m completions per step prefix with vLLM and grade them; "
                    "resumable JSONL for PRM training", "megatron_rlhf.data.step_labels_cli", "label_steps"),
    "eval-bon": ("Best-of-N evaluation: sample N per prompt, select by ORM / PRM / GenRM / random, grade with a "
                 "verifier; table + plot vs pass@N", "megatron_rlhf.evaluation.best_of_n_cli", "eval_bon"),
    "train-rl": ("RL training (GRPO, or PPO with a critic) on Ray with vLLM rollouts; resumes by itself",
                 "megatron_rlhf.trainer.rl_cli", "train_rl"),
    "eval": ("ability-dimension evaluation: public benchmarks (MATH, GSM8K, GPQA, MMLU, HumanEval, MBPP, "
             "LiveCodeBench, IFEval) from local files, answered with vLLM, graded by the verifiers; per-dimension "
             "report with deltas between two policies", "megatron_rlhf.evaluation.ability.cli", "eval"),
    "plan": ("fit planner: validate a layout and print GiB per GPU per phase; exit 0 fits, 1 does not, 2 invalid",
             "megatron_rlhf.planning.plan_cli", "plan"),
}
for _name, (_summary, _module, _function) in EXTERNAL_COMMANDS.items():
    COMMANDS[_name] = (_summary, *_external(_module, _function))


def build_parser() -> argparse.ArgumentParser:
    from megatron_rlhf import __version__

    parser = argparse.ArgumentParser(
        prog="megatron-rlhf",
        description="Megatron-Core based RLHF training stack: checkpoint tools and demo.",
        epilog="Run `megatron-rlhf COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full traceback of user errors too (for debugging)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="level of the progress messages printed on stderr (default: info)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (summary, add_arguments, run) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=summary, description=summary)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def hide_expected_notices() -> None:
    """Ignore :data:`EXPECTED_NOTICES` here and in child processes (a user's PYTHONWARNINGS wins)."""
    for message in EXPECTED_NOTICES:
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
    ours = ",".join(f"ignore:{message}:UserWarning" for message in EXPECTED_NOTICES)
    user = os.environ.get("PYTHONWARNINGS", "")
    if not user.startswith(ours):
        os.environ["PYTHONWARNINGS"] = f"{ours},{user}" if user else ours


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    hide_expected_notices()
    try:
        return args.run(args)
    except UserError as error:
        if args.traceback:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
