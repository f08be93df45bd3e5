"""`megatron-rlhf`: the command-line entry point (also `python -m megatron_rlhf`).

Every command is one :class:`Command` record in :data:`COMMANDS`: its name, its one-line
summary and the module under ``megatron_rlhf.cli`` that holds it. A command module exposes

* ``add_arguments(parser)``: its options (argparse only), and
* ``run(args) -> int``: turns the parsed arguments into one call of a library function and
  returns the exit code.

A command's module is imported only when that command is parsed (it runs, or its ``--help`` is
asked), and command modules import only the standard library and ``megatron_rlhf.cli`` at the
top: library code is imported inside ``run``. So `megatron-rlhf --help` and argument errors answer
at once and never import torch, Megatron-Core, vLLM or Ray.

Exit codes: 0 success; 1 `verify` / `check-weight-sync` found values further apart than the
tolerance (`plan`: the layout does not fit); 2 a user error (bad argument, missing file, invalid
value: a :class:`~megatron_rlhf.config.errors.UserError`), printed as `error: <message>` on stderr
without a traceback (`--traceback` shows it). Every other exception (``ValueError`` included) is a
defect and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Sequence

from megatron_rlhf.config.errors import UserError

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_USER_ERROR = 2

# Notices Megatron-Core prints on every machine without Transformer Engine or Apex (every CPU
# machine, by design). Hidden in this process and in the ranks it starts, which read PYTHONWARNINGS.
EXPECTED_NOTICES = ("Transformer Engine and Apex are not installed", "Apex is not installed")


@dataclass(frozen=True)
class Command:
    """One `megatron-rlhf` subcommand."""

    name: str
    """What the user types: ``megatron-rlhf <name> ...``."""
    summary: str
    """One line, shown by `megatron-rlhf --help` and as the command's own description."""
    module: str
    """Dotted module exposing ``add_arguments(parser)`` and ``run(args) -> int``."""

    def load(self) -> ModuleType:
        """The command's module, imported on first use."""
        return importlib.import_module(self.module)


COMMANDS: tuple[Command, ...] = (
    Command("convert-hf", "convert a Hugging Face model to a Megatron checkpoint at a given TP/PP/EP",
            "megatron_rlhf.cli.convert_hf"),
    Command("export-hf", "export a Megatron checkpoint (any TP/PP/EP) to a Hugging Face model",
            "megatron_rlhf.cli.export_hf"),
    Command("verify", "compare a Megatron checkpoint's logits with its Hugging Face model's; prints "
            "max_abs_logit_diff=<value> last and exits 1 above the tolerance", "megatron_rlhf.cli.verify"),
    Command("check-weight-sync", "load an HF model into Megatron at TP/PP, take an optimizer step, sync into "
            "vLLM, sample; prints max_abs_logprob_diff=<v> sync_seconds=<v> last, exits 1 above tolerance",
            "megatron_rlhf.cli.check_weight_sync"),
    Command("conversion-demo", "conversion check on CPU: tiny model, HF -> Megatron (TP2 x PP2) -> HF, logits "
            "and bit-exact checks", "megatron_rlhf.cli.conversion_demo"),
    Command("score", "score a JSONL file of samples with the reward verifiers/router; prints "
            "scored=<n> passed=<n> failed=<n> errors=<n> last", "megatron_rlhf.cli.score"),
    Command("demo", "the main job on CPU: tiny model, synthetic math/code/chat data, SFT, reward model, Pre-PPO "
            "selection, GRPO (or PPO) with the hybrid reward and vLLM rollouts, held-out evaluation, report",
            "megatron_rlhf.cli.demo"),
    Command("train-sft", "supervised fine-tuning on chat JSONL (loss on assistant tokens) at any TP/PP/DP",
            "megatron_rlhf.cli.train_sft"),
    Command("train-genrm", "generative reward model training: SFT of the judge's verdicts, with or without the "
            "reference answer", "megatron_rlhf.cli.train_genrm"),
    Command("train-rm", "reward-model training (ORM: Bradley-Terry + BCE; PRM: per-step BCE) at any TP/PP/DP, "
            "SPMD under torchrun", "megatron_rlhf.cli.train_rm"),
    Command("label-steps", "Math-Shepherd step labels: roll out m completions per step prefix with vLLM and grade "
            "them; resumable JSONL for PRM training", "megatron_rlhf.cli.label_steps"),
    Command("eval-bon", "Best-of-N evaluation: sample N per prompt, select by ORM / PRM / GenRM / random, grade "
            "with a verifier; table + plot vs pass@N", "megatron_rlhf.cli.eval_bon"),
    Command("train-rl", "RL training (GRPO, or PPO with a critic) on Ray with vLLM rollouts; resumes by itself",
            "megatron_rlhf.cli.train_rl"),
    Command("eval", "ability-dimension evaluation: public benchmarks (MATH, GSM8K, GPQA, MMLU, HumanEval, MBPP, "
            "LiveCodeBench, IFEval) from local files, answered with vLLM, graded by the verifiers; per-dimension "
            "report with deltas between two policies", "megatron_rlhf.cli.eval"),
    Command("plan", "fit planner: validate a layout and print GiB per GPU per phase; exit 0 fits, 1 does not, "
            "2 invalid", "megatron_rlhf.cli.plan"),
    Command("study", "scaling studies of the two papers (rm-data, prm-vs-orm, rm-size, responses-per-prompt, "
            "policy-size, ppo-vs-grpo, pre-ppo): resumable, seeded; table, plot, JSON and a trend verdict each",
            "megatron_rlhf.cli.study"),
)
"""Every subcommand, in the order `megatron-rlhf --help` lists them."""


def command_named(name: str) -> Command:
    """The :class:`Command` called ``name`` (KeyError if there is none)."""
    for command in COMMANDS:
        if command.name == name:
            return command
    raise KeyError(name)


class _CommandParser(argparse.ArgumentParser):
    """The parser of one command: its module is imported and its arguments added the first time
    it parses, so building the top-level parser imports no command module."""

    def __init__(self, *args: Any, command: Command, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._command = command
        self._arguments_added = False

    def parse_known_args(self, args=None, namespace=None):
        if not self._arguments_added:
            self._command.load().add_arguments(self)
            self._arguments_added = True
        return super().parse_known_args(args, namespace)


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
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser
    )
    for command in COMMANDS:
        subparsers.add_parser(
            command.name, help=command.summary, description=command.summary, command=command
        )
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
        return command_named(args.command).load().run(args)
    except UserError as error:
        if args.traceback:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
