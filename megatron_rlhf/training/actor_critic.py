"""PPO/GRPO actor and critic training on Megatron-Core, under any TP/PP/DP layout.

:class:`ActorTrainer` (an ``lm``-role model) and :class:`CriticTrainer` (a ``value``-role model)
each hold a :class:`~megatron_rlhf.training.megatron_step.MegatronUpdater` (DDP, Megatron's
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

On-policy updates (:meth:`ActorTrainer.update_on_policy`): when the plan is one epoch of one
minibatch (:func:`~megatron_rlhf.config.ppo_update.old_logprob_pass_reason` is None), the old
log-probs equal the update forward's, so the caller skips the old-policy pass; each microbatch's
loss takes its own forward's log-probs, detached, as the old ones (ratio exactly 1, the gradient
of today's path), and the update returns those log-probs and the entropy per response token, in
batch order, for the step's KL, entropy and engine-mismatch metrics. Refused (``ValueError``
naming the reason) whenever the plan is off-policy or something needs the old log-probs first.

Entropy: computed with gradient only when ``entropy_coef > 0``; as a detached metric when an
on-policy update reports it; not at all otherwise (the log-probs are the same bits either way).

Layout of the code: the shared plan / normalisation / stats live in :mod:`.ppo_update`.

Packing (``PPOUpdateConfig.packing``, optionally with ``max_tokens_per_microbatch``): the update
and the no-grad passes run packed rows without padding (:mod:`.ppo_update`); the on-policy
update's per-token outputs are put back in batch order whatever the microbatch split. Every step
reports ``padding_fraction``.

Not covered: prompts must be non-empty (the first response token needs a preceding position);
packing under context parallelism (refused with a clear error).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from megatron_rlhf.algorithms import AlgorithmConfig, Experience, actor_loss, critic_loss
from megatron_rlhf.config.optimizer import OptimizerSettings
from megatron_rlhf.config.ppo_update import PPOUpdateConfig, old_logprob_pass_reason
from megatron_rlhf.models.sequence_logprobs import (
    gather_responses,
    microbatch_response_logprobs,
    response_logprobs,
    response_logprobs_and_entropy,
)
from megatron_rlhf.parallel.pipeline import broadcast_from_last_stage
from megatron_rlhf.training.ppo_update import OptimizerStepStats, PPOTrainerBase
from megatron_rlhf.types import RolloutBatch

__all__ = ["ActorTrainer", "CriticTrainer", "OnPolicyUpdate", "OptimizerStepStats", "PPOUpdateConfig"]


@dataclass
class OnPolicyUpdate:
    """:meth:`ActorTrainer.update_on_policy`: its optimizer step and what its forward computed."""

    stats: list[OptimizerStepStats]
    """The one optimizer step (identical on every rank)."""
    logprobs: Tensor
    """``[b, R]`` float32 log pi_old per response token (the update forward's, before the step), 0.0
    on padding, on every rank; bitwise what :meth:`ActorTrainer.logprobs` gives in eval mode where
    the kernels do not depend on grad mode."""
    entropy: Tensor
    """``[b, R]`` float32 policy entropy per response token (nats), 0.0 on padding, on every rank."""


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

    def _token_outputs(self, entropy_metric: bool):
        """The loss's new log-probs and entropy (None when neither the loss nor a metric needs it):
        the same per-microbatch function as the no-grad passes
        (:func:`~megatron_rlhf.models.sequence_logprobs.microbatch_response_logprobs`); the
        entropy has a gradient only when the loss uses it (``entropy_coef > 0``)."""
        entropy_grad = self.algorithm.entropy_coef > 0

        def outputs(logits: Tensor, microbatch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
            return microbatch_response_logprobs(logits, microbatch, self.valid_vocab_size, self.temperature,
                                                entropy_grad or entropy_metric, entropy_grad)

        return outputs

    @property
    def dropout(self) -> float:
        """The model's largest dropout probability (hidden or attention)."""
        config = self.model.config
        return max(float(getattr(config, "hidden_dropout", 0.0) or 0.0),
                   float(getattr(config, "attention_dropout", 0.0) or 0.0))

    def old_logprob_pass_reason(self, config: PPOUpdateConfig | None = None) -> str | None:
        """Why a step needs the old-policy pass before :meth:`update`; None: :meth:`update_on_policy`
        may replace both (:func:`~megatron_rlhf.config.ppo_update.old_logprob_pass_reason`)."""
        return old_logprob_pass_reason(config or self.update_config, self.algorithm.kl_mode, self.dropout)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> Tensor:
        """``[B, R]`` float32 log pi(response token | prefix), 0.0 on padding, on every rank: the
        path the reference takes too (:func:`~megatron_rlhf.models.sequence_logprobs.response_logprobs`)."""
        config = self.update_config
        return response_logprobs(self.model, batch, self.valid_vocab_size, self.temperature,
                                 config.micro_batch_size, config.packing, config.max_tokens_per_microbatch)

    @torch.no_grad()
    def logprobs_and_entropy(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """``([B, R], [B, R])`` float32 log-probs (bitwise those of :meth:`logprobs`) and policy
        entropy per response position, in one pass."""
        config = self.update_config
        return response_logprobs_and_entropy(self.model, batch, self.valid_vocab_size, self.temperature,
                                             config.micro_batch_size, config.packing,
                                             config.max_tokens_per_microbatch)

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
        return self._update(batch, experience, self._terms(kl_coef, False), self._token_outputs(False), config)

    def update_on_policy(self, batch: RolloutBatch, experience: Experience, kl_coef: float = 0.0) -> OnPolicyUpdate:
        """One on-policy optimizer step without an old-policy pass before it (module docstring).

        ``experience.old_logprobs`` is not read (a placeholder is fine): each microbatch uses its
        own forward's log-probs, detached. Raises ``ValueError`` naming the reason when the plan
        or the algorithm needs the old-policy pass (:meth:`old_logprob_pass_reason`).
        """
        reason = self.old_logprob_pass_reason()
        if reason is not None:
            raise ValueError(f"update_on_policy refused: {reason}; run the old-policy log-prob pass and update()")
        microbatches: list[dict[str, Tensor]] = []
        samples: list[Tensor] = []
        stats = self._update(batch, experience, self._terms(kl_coef, True), self._token_outputs(True), None,
                             microbatches, samples)
        logprobs, entropy = self._forward_outputs(batch, microbatches, samples)
        return OnPolicyUpdate(stats, logprobs, entropy)

    @staticmethod
    def _forward_outputs(batch: RolloutBatch, microbatches: list[dict[str, Tensor]],
                         samples: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``([b, R], [b, R])`` per-token log-probs and entropy the update's microbatches kept
        (``samples``: their sample indices), in batch order, on every pipeline stage, 0.0 on padding."""
        shape = tuple(batch.response_ids.shape) + (2,)
        both = torch.zeros(shape, dtype=torch.float32)
        if microbatches:  # the last pipeline stage
            both[torch.cat(samples)] = torch.cat(
                [torch.stack((m["tokens/logprobs"], m["tokens/entropy"]), dim=-1).float().cpu() for m in microbatches])
        both = broadcast_from_last_stage(both)
        mask = batch.response_mask.to(torch.bool).unsqueeze(-1)
        both = torch.where(mask, both, torch.zeros((), dtype=both.dtype))
        return both[..., 0], both[..., 1]

    def _terms(self, kl_coef: float, on_policy: bool):
        """The actor's loss terms of one microbatch; ``on_policy``: the old log-probs are the
        forward's own (detached), and the per-token log-probs and entropy are kept."""

        def terms(outputs: tuple[Tensor, Tensor | None], part: Experience):
            logprobs, entropy = outputs
            if on_policy:
                part = replace(part, old_logprobs=logprobs.detach())
            kept = {"tokens/logprobs": logprobs.detach(), "tokens/entropy": entropy.detach()} if on_policy else {}
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
                **kept,
            }

        return terms


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
