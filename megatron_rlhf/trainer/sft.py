"""Supervised fine-tuning (SFT) of an ``lm``-role Megatron model on chat data, any TP/PP/DP layout.

:func:`train_sft` runs inside an initialised Megatron process (all ranks call it with the same
examples): it tokenises the conversations with the chat template
(:mod:`megatron_rlhf.data.chat`), then for each epoch shuffles them deterministically
(:func:`epoch_order`, from ``seed`` and the epoch) and cuts the order into global batches of
``global_batch_size`` conversations, one optimizer step each
(:class:`~megatron_rlhf.training.megatron_step.MegatronUpdater`: DDP, Megatron's distributed
optimizer, gradient clipping, LR schedule, 1F1B for PP > 1). DP rank ``d`` takes the ``d``-th
contiguous shard of each global batch and splits it into microbatches of ``micro_batch_size``,
right padded to the longest conversation of the global batch; with ``packing``, into packed rows
without padding (:mod:`megatron_rlhf.models.packing`: ``micro_batch_size`` conversations or a
``max_tokens_per_microbatch`` budget per row; the first token of each packed conversation is no
target, as position 0 of a padded row is none). Every step reports ``padding_fraction``.

Loss: next-token cross-entropy on assistant tokens only (``loss_mask``), averaged over every
target token of the global batch, exactly: a microbatch contributes ``sum(token NLL) /
global_tokens`` times ``num_microbatches * dp_size`` (undoing Megatron's division by the number
of microbatches and DDP's average over DP), the same rule as the PPO trainers'
:class:`~megatron_rlhf.training.ppo_update.MinibatchNorm`. The gradient and the reported step
loss are therefore the same at every layout and microbatch split. Validation loss is the exact
token mean over the whole validation set (NLL sums and token counts all-reduced over DP).

Guarantees: :class:`SFTReport` is identical on every rank; a step with a non-finite loss or
gradient is skipped on every rank and counted; conversations whose assistant tokens were all cut
by ``max_length`` are dropped and counted; the last ``len % global_batch_size`` conversations of
each epoch's order are not used in that epoch (a different remainder each epoch).

Not guaranteed: every rank tokenises the whole dataset (fine for SFT sets, not for pre-training
corpora); packing under context parallelism (refused); the model stays wrapped by Megatron DDP's
gradient hooks after training, so train it further with a fresh model or reload its export.

The trained model is written for transformers / vLLM with
:func:`megatron_rlhf.checkpoint.hf_export.save_hf_directory`; the whole job from files (spawning
ranks, checkpoint, HF export) is :func:`megatron_rlhf.trainer.sft_run.run_sft`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from megatron_rlhf.data.chat import (
    ChatExample,
    TokenizedChat,
    as_chat_examples,
    collate_chats,
    pad_token_id_of,
    tokenize_chat,
)
from megatron_rlhf.config.optimizer import OptimizerSettings
from megatron_rlhf.models.packing import padding_fraction
from megatron_rlhf.parallel.pipeline import broadcast_from_last_stage
from megatron_rlhf.training.megatron_step import MegatronUpdater

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTConfig:
    """The SFT loop: epochs, batching, sequence length, shuffling, evaluation and logging."""

    epochs: int = 1
    """Passes over the training conversations (>= 1)."""
    global_batch_size: int = 8
    """Conversations per optimizer step, over all DP ranks; a multiple of DP x micro_batch_size."""
    micro_batch_size: int = 1
    """Conversations per Megatron microbatch on one DP rank (>= 1)."""
    packing: bool = False
    """Pack each microbatch's conversations into one row without padding (THD); the same loss,
    gradient and weights as right padding, up to float summation order."""
    max_tokens_per_microbatch: int = 0
    """With ``packing``: tokens per packed microbatch on one DP rank (first-fit decreasing; a
    longer conversation gets a row of its own); ``micro_batch_size`` is then not used. 0: rows of
    ``micro_batch_size`` conversations. >= 0; needs ``packing: true``."""
    max_length: int | None = None
    """Tokens kept per conversation (longer ones are cut on the right and counted); None: the
    model's max_position_embeddings."""
    seed: int = 0
    """Seed of the per-epoch shuffle (the same order at every layout)."""
    eval_interval: int = 0
    """Validate every this many steps (>= 0); 0: only before training and after each epoch."""
    log_interval: int = 10
    """Log a step line every this many steps (>= 1), on global rank 0."""
    progress_bar: bool = True
    """Show a tqdm progress bar on global rank 0."""
    lr_decay_over_training: bool = True
    """Replace the optimizer's ``lr_decay_steps`` by this run's step count, so that a linear or
    cosine schedule reaches ``min_lr`` at the last step."""

    def __post_init__(self) -> None:
        for name in ("epochs", "global_batch_size", "micro_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name}={getattr(self, name)} must be >= 1")
        if self.max_tokens_per_microbatch < 0 or (self.max_tokens_per_microbatch and not self.packing):
            raise ValueError(f"SFTConfig.max_tokens_per_microbatch={self.max_tokens_per_microbatch} must be >= 0 "
                             "and needs packing: true")
        if self.eval_interval < 0:
            raise ValueError(f"SFTConfig.eval_interval={self.eval_interval} must be >= 0")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"SFTConfig.max_length={self.max_length} must be >= 2")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"SFTConfig.global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )


@dataclass(frozen=True)
class SFTStepStats:
    """One optimizer step; identical on every rank."""

    step: int
    """1-based optimizer step."""
    epoch: int
    """0-based epoch."""
    loss: float
    """Exact token-mean response cross-entropy (nats) of the global batch, before the update."""
    grad_norm: float | None
    """Global gradient norm before clipping; None when skipped."""
    learning_rate: float
    tokens: int
    """Target (assistant) tokens in the global batch."""
    skipped: bool
    padding_fraction: float = 0.0
    """1 - real / computed positions of the step's forward, over all DP ranks."""


@dataclass(frozen=True)
class ValidationPoint:
    step: int
    """Optimizer steps taken when it was measured (0: before training)."""
    loss: float
    """Exact token-mean response cross-entropy (nats) over the validation set."""
    tokens: int


@dataclass
class SFTReport:
    """What :func:`train_sft` did; identical on every rank."""

    steps: list[SFTStepStats] = field(default_factory=list)
    validation: list[ValidationPoint] = field(default_factory=list)
    num_examples: int = 0
    """Training conversations with at least one target token (the ones trained on)."""
    num_truncated: int = 0
    """Training conversations cut to max_length (including dropped ones)."""
    num_without_targets: int = 0
    """Training conversations dropped because max_length cut all their assistant tokens."""
    num_validation_examples: int = 0
    steps_per_epoch: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0

    @property
    def initial_validation_loss(self) -> float | None:
        return self.validation[0].loss if self.validation else None

    @property
    def final_validation_loss(self) -> float | None:
        return self.validation[-1].loss if self.validation else None


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The deterministic shuffle of ``range(num_examples)`` for ``epoch`` (same in every process)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def _sum_over_dp_and_share(values: Tensor) -> Tensor:
    """Sum float64 CPU ``values`` over DP, then give every PP stage the last stage's result."""
    from megatron.core import parallel_state

    torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
    return broadcast_from_last_stage(values)


def _token_nll_sum(
    logits: Tensor, microbatch: dict[str, Tensor], valid_vocab_size: int
) -> tuple[Tensor, Tensor]:
    """``(sum of -log p(target), number of targets)`` over the microbatch's assistant tokens."""
    from megatron.core import parallel_state

    from megatron_rlhf.models.logprobs import vocab_parallel_logprobs

    logprobs = vocab_parallel_logprobs(
        logits[:, :-1],
        microbatch["input_ids"][:, 1:],
        parallel_state.get_tensor_model_parallel_group(),
        valid_vocab_size=valid_vocab_size,
    )
    weights = microbatch["loss_mask"][:, 1:].to(device=logprobs.device, dtype=logprobs.dtype)
    return -(logprobs * weights).sum(), weights.sum()


def _microbatch_loss(
    valid_vocab_size: int,
    global_tokens: float,
    scale: int,
    logits: Tensor,
    microbatch: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """The microbatch's exact share of the global token mean, scaled for Megatron and DDP."""
    nll_sum, _ = _token_nll_sum(logits, microbatch, valid_vocab_size)
    share = nll_sum / global_tokens
    scaled = share * scale
    return scaled, {"loss": scaled.detach(), "loss_share": share.detach()}


class SFTTrainer:
    """Optimizer steps and validation of an ``lm``-role model on tokenised conversations."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerSettings,
        config: SFTConfig,
        valid_vocab_size: int,
        pad_token_id: int,
    ):
        if getattr(model, "role", None) != "lm":
            raise ValueError(f"SFT needs an 'lm'-role model, got role {getattr(model, 'role', None)!r}")
        self.model = model
        self.config = config
        self.valid_vocab_size = valid_vocab_size
        self.pad_token_id = pad_token_id
        self.updater = MegatronUpdater(model, optimizer)
        self.device = next(model.parameters()).device

    def _microbatches(self, chats: Sequence[TokenizedChat], length: int) -> list[dict[str, Tensor]]:
        batch = collate_chats(chats, self.pad_token_id, length)
        size = self.config.micro_batch_size
        if self.config.packing:
            return self._packed(batch)
        return [
            {"input_ids": ids.to(self.device), "loss_mask": mask.to(self.device)}
            for ids, mask in zip(batch.input_ids.split(size), batch.loss_mask.split(size))
        ]

    def _packed(self, batch) -> list[dict[str, Tensor]]:
        """Packed rows of ``batch`` (a ``ChatBatch``); no target at any conversation's first token."""
        from megatron.core import parallel_state

        from megatron_rlhf.models.packing import packed_microbatches, packed_to, token_budget_microbatches
        from megatron_rlhf.models.sequence_padding import sequence_multiple

        if self.model.config.context_parallel_size > 1:
            raise ValueError("SFTConfig.packing does not cover context parallelism; use context_parallel=1")
        plan = token_budget_microbatches(batch.sequence_lengths.tolist(), self.config.max_tokens_per_microbatch,
                                         self.config.micro_batch_size)
        rows = packed_microbatches(batch.input_ids, batch.sequence_lengths, None, plan, sequence_multiple(self.model.config),
                                   parallel_state.get_pipeline_model_parallel_world_size() > 1, self.pad_token_id,
                                   {"loss_mask": batch.loss_mask})
        for row in rows:
            row["loss_mask"][0, row["packed_seq_params"].cu_seqlens_q[:-1].long()] = 0.0
        return [packed_to(row, self.device, ("input_ids", "position_ids", "loss_mask")) for row in rows]

    def _computed_positions(self, microbatches: list[dict], length: int, rows: int) -> int:
        from megatron_rlhf.models.sequence_padding import schedule_seq_length

        if self.config.packing:
            return sum(microbatch["computed_tokens"] for microbatch in microbatches)
        return rows * schedule_seq_length(self.model.config, length)

    def step(self, chats: Sequence[TokenizedChat], step: int, epoch: int) -> SFTStepStats:
        """One optimizer step on a global batch (the same ``chats`` on every rank)."""
        from megatron.core import parallel_state

        dp = parallel_state.get_data_parallel_world_size()
        shard = len(chats) // dp
        if shard * dp != len(chats) or (shard % self.config.micro_batch_size and not self.config.packing):
            raise ValueError(
                f"a global batch of {len(chats)} conversations does not split into {dp} DP shards "
                f"of whole microbatches of micro_batch_size={self.config.micro_batch_size}"
            )
        rank = parallel_state.get_data_parallel_rank()
        length = max(len(chat.token_ids) for chat in chats)
        tokens = sum(chat.num_loss_tokens for chat in chats)
        mine = chats[rank * shard : (rank + 1) * shard]
        microbatches = self._microbatches(mine, length)
        loss_fn = partial(
            _microbatch_loss, self.valid_vocab_size, float(max(tokens, 1)), len(microbatches) * dp
        )
        result = self.updater.step(microbatches, loss_fn)
        local = sum(float(metrics["loss_share"]) for metrics in result.metrics)
        positions = (sum(len(chat.token_ids) for chat in mine), self._computed_positions(microbatches, length, shard))
        totals = _sum_over_dp_and_share(torch.tensor([local, *positions], dtype=torch.float64))
        grad_norm = None if result.skipped or result.grad_norm is None else float(result.grad_norm)
        return SFTStepStats(step, epoch, float(totals[0]), grad_norm, result.learning_rate, tokens, result.skipped,
                            padding_fraction(float(totals[1]), float(totals[2])))

    @torch.no_grad()
    def validation_loss(self, chats: Sequence[TokenizedChat], step: int) -> ValidationPoint:
        """Exact token-mean response NLL over ``chats`` (the same list on every rank)."""
        from megatron.core import parallel_state

        from megatron_rlhf.models.forward import forward_only

        totals = torch.zeros(2, dtype=torch.float64)
        dp = parallel_state.get_data_parallel_world_size()
        local = list(chats)[parallel_state.get_data_parallel_rank() :: dp]
        if local:
            size = self.config.micro_batch_size
            filler = TokenizedChat(local[0].token_ids, (0,) * len(local[0].token_ids), False)
            if not self.config.packing:  # packed rows need no equal microbatches
                local += [filler] * (-len(local) % size)  # equal microbatches; no targets in fillers
            length = max(len(chat.token_ids) for chat in chats)

            def collect(logits: Tensor, microbatch: dict[str, Tensor]) -> Tensor:
                nll, count = _token_nll_sum(logits, microbatch, self.valid_vocab_size)
                return torch.stack([nll, count]).double().cpu()

            for part in forward_only(self.model, self._microbatches(local, length), collect):
                totals += part
        totals = _sum_over_dp_and_share(totals)
        nll, count = float(totals[0]), round(float(totals[1]))
        return ValidationPoint(step, nll / count if count else math.nan, count)


def _tokenize_all(
    tokenizer: Any, examples: Sequence[ChatExample], max_length: int
) -> list[TokenizedChat]:
    return [tokenize_chat(tokenizer, example, max_length) for example in examples]


def train_sft(
    model: torch.nn.Module,
    arch: Any,
    tokenizer: Any,
    examples: Sequence[ChatExample | Mapping[str, Any]],
    config: SFTConfig,
    optimizer: OptimizerSettings | None = None,
    validation_examples: Sequence[ChatExample | Mapping[str, Any]] = (),
) -> SFTReport:
    """Fine-tune ``model`` (this rank's stage of an ``lm``-role model built for ``arch``) in place.

    Every rank must call it with the same examples (``ChatExample``s or ``{"messages": ...}`` /
    ``{"prompt", "response"}`` dicts). ``optimizer``: None means ``OptimizerSettings()``.
    Returns the same :class:`SFTReport` on every rank.
    """
    start = time.perf_counter()
    max_length = config.max_length or arch.max_position_embeddings
    if max_length > arch.max_position_embeddings:
        raise ValueError(
            f"SFTConfig.max_length={max_length} exceeds the model's max_position_embeddings="
            f"{arch.max_position_embeddings}"
        )
    train = _tokenize_all(tokenizer, as_chat_examples(examples, "examples"), max_length)
    valid = _tokenize_all(
        tokenizer, as_chat_examples(validation_examples, "validation_examples"), max_length
    )
    usable = [chat for chat in train if chat.num_loss_tokens > 0]
    valid = [chat for chat in valid if chat.num_loss_tokens > 0]
    report = SFTReport(
        num_examples=len(usable),
        num_truncated=sum(chat.truncated for chat in train),
        num_without_targets=len(train) - len(usable),
        num_validation_examples=len(valid),
        steps_per_epoch=len(usable) // config.global_batch_size,
    )
    if report.steps_per_epoch == 0:
        raise ValueError(
            f"{len(usable)} usable training conversations ({report.num_without_targets} had no "
            f"assistant token within max_length={max_length}) do not fill one global batch of "
            f"global_batch_size={config.global_batch_size}"
        )
    total = report.steps_per_epoch * config.epochs
    optimizer = optimizer or OptimizerSettings()
    if config.lr_decay_over_training:
        optimizer = replace(optimizer, lr_decay_steps=total)
    trainer = SFTTrainer(model, optimizer, config, arch.vocab_size, pad_token_id_of(tokenizer))
    is_logger = torch.distributed.get_rank() == 0
    if is_logger:
        log.info(
            "SFT: %d conversations (%d truncated, %d without targets dropped), %d validation, "
            "%d epochs x %d steps", report.num_examples, report.num_truncated,
            report.num_without_targets, len(valid), config.epochs, report.steps_per_epoch,
        )
    _validate(trainer, valid, 0, report, is_logger)
    progress = _progress_bar(total, enabled=is_logger and config.progress_bar)
    with _logs_above_the_bar(progress):
        _train_epochs(trainer, usable, valid, config, report, progress, is_logger)
    progress.close()
    report.skipped_steps = trainer.updater.skipped_steps
    report.seconds = time.perf_counter() - start
    return report


def _train_epochs(
    trainer: SFTTrainer,
    usable: list[TokenizedChat],
    valid: list[TokenizedChat],
    config: SFTConfig,
    report: SFTReport,
    progress: Any,
    is_logger: bool,
) -> None:
    total = report.steps_per_epoch * config.epochs
    step = 0
    for epoch in range(config.epochs):
        order = epoch_order(len(usable), config.seed, epoch)
        size = config.global_batch_size
        for index in range(report.steps_per_epoch):
            step += 1
            batch = [usable[i] for i in order[index * size : (index + 1) * size]]
            stats = trainer.step(batch, step, epoch)
            report.steps.append(stats)
            progress.update(1)
            progress.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
            if is_logger and step % config.log_interval == 0:
                log.info(
                    "step %d/%d epoch %d loss %.4f grad_norm %s lr %.3g tokens %d padding %.3f%s", step, total,
                    epoch, stats.loss, "-" if stats.grad_norm is None else f"{stats.grad_norm:.3f}",
                    stats.learning_rate, stats.tokens, stats.padding_fraction, " SKIPPED" if stats.skipped else "",
                )
            last_of_epoch = index == report.steps_per_epoch - 1
            if last_of_epoch or (config.eval_interval and step % config.eval_interval == 0):
                _validate(trainer, valid, step, report, is_logger)


def _validate(
    trainer: SFTTrainer, valid: list[TokenizedChat], step: int, report: SFTReport, is_logger: bool
) -> None:
    if not valid:
        return
    point = trainer.validation_loss(valid, step)
    report.validation.append(point)
    if is_logger:
        log.info("validation after %d steps: loss %.4f over %d tokens", step, point.loss, point.tokens)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="sft", unit="step", disable=not enabled, dynamic_ncols=True)


def _logs_above_the_bar(progress: Any):
    """Route log lines through tqdm while the bar is shown, so they do not break it."""
    import contextlib

    if progress.disable:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()
