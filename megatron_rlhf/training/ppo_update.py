"""The PPO update machinery shared by the actor and critic trainers (:mod:`.actor_critic`).

:class:`PPOTrainerBase` plans epochs x minibatches x DP shards x microbatches over a rollout batch,
normalises each microbatch's loss to its exact share of the minibatch reduction (see
:class:`MinibatchNorm` and the :mod:`.actor_critic` docstring), runs one
:class:`~megatron_rlhf.training.megatron_step.MegatronUpdater` step per minibatch and reduces the
step's metrics over microbatches, DP and PP so that :class:`OptimizerStepStats` is identical on
every rank. It also runs no-grad forward passes that read one value per response token.

Guarantees: each DP rank receives only its share of the rollout (TP/PP/CP peers of one DP
replica receive the same share), laid out as ``num_minibatches`` contiguous equal groups, group
``k`` being this rank's part of minibatch ``k`` (see
:func:`~megatron_rlhf.parallel.data_dispatch.balanced_shards`). The minibatch's loss denominator
is the sum of the DP ranks' local denominators (one all-reduce per minibatch), so the loss and
gradient are those of the exact reduction over the whole minibatch. A share that does not split
into whole microbatches raises ``ValueError`` naming the sizes. At DP=1 the share is the batch.

Packing (``PPOUpdateConfig.packing``): a minibatch part is split into packed rows
(:func:`~megatron_rlhf.models.sequence_logprobs.packed_response_microbatches`) of
``micro_batch_size`` samples or of a token budget (``max_tokens_per_microbatch``); DP ranks may then
run different numbers of microbatches, each normalised by its own count (the gradients are
reduced once, after the last microbatch). Every step reports ``padding_fraction`` (1 - real /
computed positions over the minibatch, all DP ranks) in its terms, packed or not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from megatron_rlhf.algorithms import AlgorithmConfig, Experience, reduction_parts
from megatron_rlhf.config.optimizer import OptimizerSettings
from megatron_rlhf.config.ppo_update import PPOUpdateConfig  # re-exported: the old import path keeps working
from megatron_rlhf.models.packing import padding_fraction
from megatron_rlhf.models.sequence_logprobs import (
    packed_response_microbatches,
    per_response_token,
    response_positions,
    sample_lengths,
)
from megatron_rlhf.models.sequence_padding import schedule_seq_length
from megatron_rlhf.parallel.pipeline import broadcast_from_last_stage
from megatron_rlhf.training.megatron_step import MegatronUpdater
from megatron_rlhf.types import RolloutBatch

# loss terms of one microbatch: (response-token outputs [b, R], experience) ->
# (reduced loss [], {metric name: token-mean metric []})
TermsFn = Callable[[Tensor, Experience], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class OptimizerStepStats:
    """One optimizer step of :meth:`update`; identical on every rank."""

    epoch: int
    """0-based PPO epoch."""
    minibatch: int
    """0-based minibatch within the epoch."""
    loss: float
    """Exact minibatch loss (the configured reduction over the whole minibatch)."""
    grad_norm: float | None
    """Global gradient norm before clipping (None when skipped)."""
    learning_rate: float
    """Learning rate the step used."""
    skipped: bool
    """True when a non-finite loss or gradient made the updater skip the step."""
    terms: dict[str, float] = field(default_factory=dict)
    """Loss terms (same normalisation as ``loss``) and token-mean metrics over the minibatch."""


def _weighted(name: str, value: Tensor, share: Tensor, token_share: Tensor) -> Tensor:
    """A microbatch metric's contribution to the minibatch value: loss terms by the reduction's
    denominator share, token-mean metrics (``*fraction``, ``ratio_mean``, ``approx_kl``) by the
    token share; ``*_max`` metrics are reduced with max instead and pass unchanged, and so do
    per-token outputs (``tokens/*``, ``[b, R]``: what the forward computed, kept per sample)."""
    if name.endswith("_max") or name.startswith("tokens/"):
        return value
    if name.endswith("fraction") or name in ("ratio_mean", "approx_kl"):
        return value * token_share
    return value * share


@dataclass(frozen=True)
class MinibatchNorm:
    """What a microbatch needs to contribute its exact share of a minibatch's loss."""

    reduction: str
    denominator: float
    """The reduction's denominator over the whole minibatch (all DP shares), at least 1."""
    tokens: float
    """Response tokens in the whole minibatch, at least 1 (for token-mean metrics)."""
    scale: int
    """num_microbatches * dp_size (this rank's count): undoes Megatron's per-microbatch and DDP's
    DP averaging."""
    padding_fraction: float = 0.0
    """1 - real / computed positions of the minibatch's forward, over all DP shares."""

    @classmethod
    def of(cls, response_mask: Tensor, reduction: str, scale: int, group=None,
           real_positions: int = 0, computed_positions: int = 0) -> MinibatchNorm:
        """From this rank's share of the minibatch; ``group`` (the DP group) sums the shares
        (and this rank's real / computed positions, in the same all-reduce)."""
        parts = reduction_parts(torch.zeros(response_mask.shape), response_mask, reduction)
        counts = torch.stack([parts.denominator.double(), response_mask.to(torch.bool).sum().double(),
                              torch.tensor(float(real_positions), dtype=torch.float64),
                              torch.tensor(float(computed_positions), dtype=torch.float64)])
        if group is not None and group.size() > 1:
            torch.distributed.all_reduce(counts, group=group)
        return cls(reduction, float(counts[0].clamp(min=1)), float(counts[1].clamp(min=1)), scale,
                   padding_fraction(float(counts[2]), float(counts[3])))


class PPOTrainerBase:
    """What the actor and critic share: minibatch / microbatch plan, normalisation, stats."""

    role = ""
    """Model role a subclass trains (``RoleModel.role``)."""
    metric_names: tuple[str, ...] = ("loss_share",)
    """Names a subclass's loss terms report; ``*_max`` ones are max-reduced, others summed."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerSettings,
        algorithm: AlgorithmConfig,
        update: PPOUpdateConfig,
    ):
        if getattr(model, "role", None) != self.role:
            raise ValueError(
                f"{type(self).__name__} needs a {self.role!r}-role model, got {getattr(model, 'role', None)!r}"
            )
        self.model = model
        self.algorithm = algorithm
        self.update_config = update
        self.updater = MegatronUpdater(model, optimizer)

    @property
    def skipped_steps(self) -> int:
        return self.updater.skipped_steps

    def _per_position(self, batch: RolloutBatch, collect: Callable[[Tensor, dict], Tensor]) -> Tensor:
        """``[B, R]`` of ``collect(output, microbatch) -> [b, R]`` over the batch, on every rank
        (:func:`~megatron_rlhf.models.sequence_logprobs.per_response_token`)."""
        config = self.update_config
        return per_response_token(self.model, batch, config.micro_batch_size, collect, (), config.packing,
                                  config.max_tokens_per_microbatch)

    @staticmethod
    def _plan(count: int, config: PPOUpdateConfig) -> int:
        """Validated size of this rank's part of each minibatch (``count`` is its share)."""
        if count % config.num_minibatches:
            raise ValueError(
                f"this rank's share of {count} samples is not divisible by "
                f"num_minibatches={config.num_minibatches}"
            )
        local = count // config.num_minibatches
        if not config.packing and local % config.micro_batch_size:
            raise ValueError(
                f"this rank's part of a minibatch ({local} samples) does not split into whole "
                f"microbatches of micro_batch_size={config.micro_batch_size}"
            )
        return local

    def _update(
        self,
        batch: RolloutBatch,
        experience: Experience,
        terms_fn: TermsFn,
        model_output: Callable[[Tensor, dict[str, Tensor]], object],
        config: PPOUpdateConfig | None,
        microbatch_metrics: list[dict[str, Tensor]] | None = None,
        microbatch_samples: list[Tensor] | None = None,
    ) -> list[OptimizerStepStats]:
        """The optimizer steps; ``microbatch_metrics`` (when given) receives every microbatch's
        metrics in schedule order (epochs, minibatches, microbatches; last pipeline stage only),
        ``microbatch_samples`` every microbatch's sample indices in the same order (every stage)."""
        from megatron.core import parallel_state

        config = config or self.update_config
        responses = tuple(batch.response_ids.shape)
        if tuple(experience.response_mask.shape) != responses:
            raise ValueError(
                f"experience {tuple(experience.response_mask.shape)} does not match the rollout "
                f"batch responses {responses}"
            )
        local_size = self._plan(batch.num_samples, config)
        dp = parallel_state.get_data_parallel_world_size()
        dp_group = parallel_state.get_data_parallel_group()
        sequences = response_positions(batch)
        lengths = sample_lengths(batch)
        stats = []
        for epoch in range(config.ppo_epochs):
            for index in range(config.num_minibatches):
                local = torch.arange(index * local_size, (index + 1) * local_size)
                microbatches, computed = self._microbatches(batch, sequences, local, config)
                norm = MinibatchNorm.of(
                    experience.response_mask[local],
                    self.algorithm.loss_reduction,
                    len(microbatches) * dp,
                    dp_group,
                    int(lengths[local].sum()),
                    computed,
                )
                loss_fn = partial(self._microbatch_loss, experience, terms_fn, model_output, norm)
                result = self.updater.step(microbatches, loss_fn)
                if microbatch_metrics is not None:
                    microbatch_metrics.extend(result.metrics)
                if microbatch_samples is not None:
                    microbatch_samples.extend(microbatch["sample_index"] for microbatch in microbatches)
                step = self._step_stats(epoch, index, result)
                step.terms["padding_fraction"] = norm.padding_fraction
                stats.append(step)
        return stats

    def _microbatches(self, batch: RolloutBatch, sequences: tuple[Tensor, Tensor], local: Tensor,
                      config: PPOUpdateConfig) -> tuple[list[dict], int]:
        """The microbatches of the samples ``local`` of this rank's share (each with ``positions``
        and ``sample_index``) and the positions their forward computes: packed rows when
        ``config.packing``, else ``micro_batch_size`` right-padded sequences each. ``sequences``:
        :func:`~megatron_rlhf.models.sequence_logprobs.response_positions` of ``batch``."""
        if config.packing:
            microbatches = packed_response_microbatches(self.model, batch, local, config.micro_batch_size,
                                                        config.max_tokens_per_microbatch, sequences)
            return microbatches, sum(microbatch["computed_tokens"] for microbatch in microbatches)
        input_ids, positions = sequences
        device = next(self.model.parameters()).device
        microbatches = [{"input_ids": input_ids[part].to(device), "positions": positions[part], "sample_index": part}
                        for part in local.split(config.micro_batch_size)]
        return microbatches, local.numel() * schedule_seq_length(self.model.config, input_ids.shape[1])

    @staticmethod
    def _microbatch_loss(
        experience: Experience,
        terms_fn: TermsFn,
        model_output: Callable[[Tensor, dict[str, Tensor]], object],
        norm: MinibatchNorm,
        output: Tensor,
        microbatch: dict[str, Tensor],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The microbatch's share of the minibatch loss, scaled for Megatron and DDP (module doc)."""
        part = experience.select(microbatch["sample_index"]).to(output.device)
        loss, metrics = terms_fn(model_output(output, microbatch), part)
        mask = part.response_mask
        share = reduction_parts(mask.new_zeros(mask.shape, dtype=loss.dtype), mask, norm.reduction)
        share = share.denominator.to(loss.dtype) / norm.denominator
        token_share = mask.to(torch.bool).sum().to(loss.dtype) / norm.tokens
        scaled = loss * share * norm.scale
        weighted = {name: _weighted(name, value, share, token_share) for name, value in metrics.items()}
        return scaled, {
            "loss": scaled.detach(),
            "loss_share": (loss * share).detach(),
            **weighted,
        }

    def _step_stats(self, epoch: int, index: int, result) -> OptimizerStepStats:
        """Sum the microbatch shares over microbatches and DP; broadcast from the last stage."""
        from megatron.core import parallel_state

        names = list(self.metric_names)
        summed = [name for name in names if not name.endswith("_max")]
        maxed = [name for name in names if name.endswith("_max")]
        totals = torch.zeros(len(summed), dtype=torch.float64)
        maxima = torch.zeros(len(maxed), dtype=torch.float64)  # metrics named *_max are >= 0
        for metrics in result.metrics:
            totals += torch.stack([metrics[name].double().cpu().reshape(()) for name in summed])
            if maxed:
                maxima = torch.maximum(
                    maxima,
                    torch.stack([metrics[n].double().cpu().reshape(()) for n in maxed]),
                )
        group = parallel_state.get_data_parallel_group()
        torch.distributed.all_reduce(totals, group=group)
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=group)
        totals = broadcast_from_last_stage(torch.cat([totals, maxima]))
        values = dict(zip(summed + maxed, totals.tolist()))
        loss = values.pop("loss_share")
        return OptimizerStepStats(
            epoch,
            index,
            loss,
            None if result.skipped else float(result.grad_norm),
            result.learning_rate,
            result.skipped,
            values,
        )
