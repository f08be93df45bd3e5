"""Generative reward model (GenRM) training: SFT of an ``lm`` model to write the judge's verdict.

As in "Exploring Data Scaling Trends and Effects in RLHF" (ByteDance Seed), the GenRM judges a
response to a prompt, with the ground-truth reference (reasoning tasks) or without it (general
tasks). Training is supervised fine-tuning: each labelled record ``{"prompt", "response",
"label"[, "reference" | "ground_truth"][, "rationale"]}`` becomes a conversation whose user turn is
the judge prompt and whose assistant turn is the target judgement (optional rationale + a
verdict line). Prompt text and verdict format come from :mod:`megatron_rlhf.rewards.genrm`
(:func:`~megatron_rlhf.rewards.genrm.genrm_training_examples`), the same module that scores with
the trained judge, so what it is trained on is what it is asked. The loss is the SFT loss
(:mod:`megatron_rlhf.trainer.sft`): next-token cross-entropy on the judgement tokens only.

Entry points: :func:`train_genrm` inside an initialised Megatron process (e.g. the demo);
:func:`run_genrm` as a job from a records file (spawns ranks, writes checkpoint + HF model like
:func:`megatron_rlhf.trainer.sft_run.run_sft`), the body of `megatron-rlhf train-genrm`
(:mod:`megatron_rlhf.cli.train_genrm`).

Guarantees: a malformed record line raises before any rank starts, naming ``file:line``.
Not guaranteed: that the judge's verdicts are right (validation reports the judgement-token
loss, not verdict accuracy, which needs generation: see
:class:`~megatron_rlhf.rewards.genrm.GenRMSource`).

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GenRMDataConfig:
    """How labelled records become judge conversations."""

    with_reference: bool = False
    """Show the reference answer to the judge (each record needs ``reference`` / ``ground_truth``)."""
    verdict_format: str = "binary"
    """binary ("Verdict: correct/incorrect"; labels 0/1) | score ("Score: k/10"; labels in [0, 1])."""
    max_field_chars: int = 8000
    """Prompt, response and reference are each cut to this many characters (>= 100)."""

    def __post_init__(self) -> None:
        if self.verdict_format not in ("binary", "score"):
            raise ValueError(f"verdict_format={self.verdict_format!r} (choose binary or score)")
        if self.max_field_chars < 100:
            raise ValueError(f"max_field_chars={self.max_field_chars} must be >= 100")


def genrm_chat_examples(
    records: Sequence[Mapping[str, Any]], data: GenRMDataConfig, where: str = "records"
) -> list:
    """Judge conversations (:class:`~megatron_rlhf.data.chat.ChatExample`) for labelled records."""
    from megatron_rlhf.data.chat import as_chat_examples
    from megatron_rlhf.rewards.genrm import genrm_training_examples

    examples = genrm_training_examples(
        records, data.with_reference, data.verdict_format, data.max_field_chars
    )
    return as_chat_examples(examples, where)


def read_genrm_records(path: str | Path, data: GenRMDataConfig) -> list:
    """Judge conversations from a labelled-records JSONL; bad lines raise naming ``file:line``."""
    from megatron_rlhf.data.chat import ChatExample
    from megatron_rlhf.data.jsonl import RecordError, read_jsonl

    def parse(record: Mapping[str, Any]):
        try:
            return genrm_chat_examples([record], data)[0]
        except ValueError as error:
            raise RecordError(str(error).removeprefix("record 0: ")) from error

    dataset = read_jsonl(path, parse, strict=True)
    return [
        ChatExample(example.messages, f"{dataset.path}:{line}")
        for example, line in zip(dataset.records, dataset.lines)
    ]


def train_genrm(
    model: Any,
    arch: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    data: GenRMDataConfig,
    config: Any,
    optimizer: Any,
    validation_records: Sequence[Mapping[str, Any]] = (),
):
    """Train ``model`` (an ``lm``-role stage, in place) as a GenRM on labelled ``records``.

    ``config`` / ``optimizer``: :class:`~megatron_rlhf.trainer.sft.SFTConfig` /
    :class:`~megatron_rlhf.config.optimizer.OptimizerSettings`. Every rank passes the same
    records; returns the :class:`~megatron_rlhf.trainer.sft.SFTReport`.
    """
    from megatron_rlhf.trainer.sft import train_sft

    examples = genrm_chat_examples(records, data, "records")
    validation = genrm_chat_examples(validation_records, data, "validation_records")
    return train_sft(model, arch, tokenizer, examples, config, optimizer, validation)


def run_genrm(config: Any, data: GenRMDataConfig):
    """The GenRM job: ``config`` is an :class:`~megatron_rlhf.trainer.sft_run.SFTRunConfig` whose
    ``train_path`` / ``validation_path`` hold labelled records (not chat data)."""
    from megatron_rlhf.trainer.sft_run import run_sft

    train = read_genrm_records(config.train_path, data)
    validation = None
    if config.validation_path is not None:
        validation = read_genrm_records(config.validation_path, data)
    return run_sft(config, train_examples=train, validation_examples=validation)

