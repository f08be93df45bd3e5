"""PPO/GRPO actor and critic training on Megatron-Core, under any TP/PP/DP layout.

:class:`ActorTrainer` (an ``lm``-role model) and :class:`CriticTrainer` (a ``value``-role model)
each hold a :class:`~megatron_rlhf.trainer.megatron_step.MegatronUpdater` (DDP, Megatron's
distributed optimizer, gradient clipping, LR schedule, 1F1B for PP > 1) and provide:

* ``logprobs(batch)`` / ``values(batch)``: ``[b, R]`` per response token of the samples this
  rank was given, on every rank of its DP replica. The
  value for response token ``t`` is read at the position of the token before it, the same
  alignment as the log-prob of ``t`` (logits at position ``p`` predict token ``p + 1``).
* ``update(batch, experience)``: ``ppo_epochs`` passes over this DP rank's share of the rollout
  batch (:func:`~megatron_rlhf.parallel.data_dispatch.balanced_shards`: ``num_minibatches``
  contiguous groups, one optimizer step each, group ``k`` being this rank's part of minibatch
  ``k``). Each part is split into microbatches of ``micro_batch_size`` full sequences (prompt +
  response, right padded to the longest sequence of the share so that all microbatches of this
  rank share one shape). At DP=1 the share is the whole batch.
  The per-token loss is computed on the last pipeline stage from vocab-parallel logits
  (:func:`~megatron_rlhf.models.logprobs.logprobs_and_entropy`) with
  :func:`~megatron_rlhf.algorithms.actor_loss` / :func:`~megatron_rlhf.algorithms.critic_loss`.

Loss normalisation (the same gradient for every DP / microbatch split): each term of the
algorithm loss is ``numerator / denominator`` (:func:`~megatron_rlhf.algorithms.reduction_parts`;
tokens for ``token_mean``, non-empty sequences for ``seq_*``). A microbatch contributes its
reduced loss times ``local_denominator / minibatch_denominator``, where the minibatch denominator
is counted over the whole minibatch (the sum of the DP ranks' local counts, one all-reduce per
minibatch). That contribution is multiplied by ``num_microbatches * dp_size`` to undo Megatron's
division by the number of microbatches and DDP's average over DP. The gradient is therefore that
of the exact minibatch reduction (e.g. the global token mean), and the reported step ``loss`` is
its exact value (summed over microbatches and DP, broadcast over PP).

Non-finite values: loss inputs are not checked eagerly (``check_finite_inputs=False``); a NaN/Inf
loss or gradient on any rank makes the updater skip the whole step on every rank (no parameter,
optimizer-state or LR change, so nothing non-finite can reach a checkpoint); it is counted in
``skipped_steps`` and reported with ``skipped=True``.

Layout of the code: the shared plan / normalisation / stats live in :mod:`.ppo_update`.

Not covered: packed (THD) sequences -- variable lengths are handled by right padding with the
response mask; prompts must be non-empty (the first response token needs a preceding position).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rlhf.algorithms import AlgorithmConfig, Experience, actor_loss, critic_loss
from megatron_rlhf.config.optimizer import OptimizerSettings
from megatron_rlhf.config.ppo_update import PPOUpdateConfig
from megatron_rlhf.models.sequence_logprobs import (
    gather_responses,
    microbatch_response_logprobs,
    response_logprobs,
    response_logprobs_and_entropy,
)
from megatron_rlhf.trainer.ppo_update import OptimizerStepStats, PPOTrainerBase
from megatron_rlhf.types import RolloutBatch

__all__ = ["ActorTrainer", "CriticTrainer", "OptimizerStepStats", "PPOUpdateConfig"]


class ActorTrainer(PPOTrainerBase):
    """Policy (actor) training: PPO clipped surrogate + optional KL loss and entropy bonus."""

    role = "lm"
    metric_names = (
        "approx_kl",
        "clip_fraction",
        "entropy_loss",
        "kl_loss",
        "loss_share",
        "policy_loss",
        "ratio_mean",
        "ratio_deviation_max",
    )

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerSettings,
        algorithm: AlgorithmConfig,
        update: PPOUpdateConfig,
        valid_vocab_size: int,
        temperature: float = 1.0,
    ):
        super().__init__(model, optimizer, algorithm, update)
        if not temperature > 0:
            raise ValueError(f"ActorTrainer temperature={temperature} must be > 0")
        self.valid_vocab_size = valid_vocab_size
        self.temperature = temperature
        """The sampling temperature of the responses it trains on: log-probs (old, new, and the
        PPO ratio between them) are those of ``softmax(logits / temperature)``, the distribution
        the engine sampled from."""

    def _token_logprobs(self, logits: Tensor, microbatch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The loss's new log-probs and entropy: the same per-microbatch function as the no-grad
        passes (:func:`~megatron_rlhf.models.sequence_logprobs.microbatch_response_logprobs`)."""
        return microbatch_response_logprobs(logits, microbatch, self.valid_vocab_size, self.temperature, True)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> Tensor:
        """``[B, R]`` float32 log pi(response token | prefix), 0.0 on padding, on every rank: the
        path the reference takes too (:func:`~megatron_rlhf.models.sequence_logprobs.response_logprobs`)."""
        return response_logprobs(self.model, batch, self.valid_vocab_size, self.temperature,
                                 self.update_config.micro_batch_size)

    @torch.no_grad()
    def logprobs_and_entropy(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """``([B, R], [B, R])`` float32 log-probs (bitwise those of :meth:`logprobs`) and policy
        entropy per response position, in one pass."""
        return response_logprobs_and_entropy(self.model, batch, self.valid_vocab_size, self.temperature,
                                             self.update_config.micro_batch_size)

    def update(
        self,
        batch: RolloutBatch,
        experience: Experience,
        kl_coef: float = 0.0,
        config: PPOUpdateConfig | None = None,
    ) -> list[OptimizerStepStats]:
        """PPO epochs x minibatches of actor updates; ``experience`` is ``[B, R]`` like ``batch``.

        ``config`` overrides the trainer's :class:`PPOUpdateConfig` for this call.
        """

        def terms(outputs: tuple[Tensor, Tensor], part: Experience):
            logprobs, entropy = outputs
            entropy = entropy if self.algorithm.entropy_coef > 0 else None
            result = actor_loss(
                self.algorithm,
                part,
                logprobs,
                entropy=entropy,
                kl_coef=kl_coef,
                check_finite_inputs=False,
            )
            m = result.metrics
            ratio = torch.exp(logprobs.detach() - part.old_logprobs)
            deviation = torch.where(
                part.response_mask.to(torch.bool),
                (ratio - 1).abs(),
                torch.zeros_like(ratio),
            )
            return result.loss, {
                "policy_loss": result.policy_loss.detach(),
                "kl_loss": result.kl_loss.detach(),
                "entropy_loss": result.entropy_loss.detach(),
                "clip_fraction": m.clip_fraction,
                "approx_kl": m.approx_kl,
                "ratio_mean": m.ratio_mean,
                "ratio_deviation_max": deviation.amax() if deviation.numel() else deviation.new_zeros(()),
            }

        return self._update(batch, experience, terms, self._token_logprobs, config)


class CriticTrainer(PPOTrainerBase):
    """Value (critic) training with the clipped value loss."""

    role = "value"
    metric_names = ("loss_share", "value_clip_fraction")

    @staticmethod
    def _response_values(values: Tensor, microbatch: dict[str, Tensor]) -> Tensor:
        return gather_responses(values, microbatch["positions"])

    @torch.no_grad()
    def values(self, batch: RolloutBatch) -> Tensor:
        """``[B, R]`` float32 V(state before response token t), 0.0 on padding, on every rank."""
        return self._per_position(batch, self._response_values)

    def update(
        self,
        batch: RolloutBatch,
        experience: Experience,
        config: PPOUpdateConfig | None = None,
    ) -> list[OptimizerStepStats]:
        """PPO epochs x minibatches of critic updates (needs ``returns`` and ``old_values``)."""

        def terms(values: Tensor, part: Experience):
            result = critic_loss(self.algorithm, part, values, check_finite_inputs=False)
            return result.loss, {"value_clip_fraction": result.clip_fraction}

        return self._update(batch, experience, terms, self._response_values, config)
