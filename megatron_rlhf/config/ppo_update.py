"""How one rollout batch is turned into optimizer steps (a light value type).

Kept apart from :mod:`megatron_rlhf.training.ppo_update` (the heavy update machinery) so that
configs and workers can name the plan without importing the trainer. Guarantees: an instance is
validated on construction (a bad value raises ``ValueError`` naming it); whether the plan divides
a given batch is checked where the batch is known.

There is no temperature here: the log-probs of the actor and the reference are computed at the
sampling temperature of the run (``RLConfig.temperature``), the one the engine samples at, so the
PPO ratio and the weight-sync check compare the same distribution.

:func:`old_logprob_pass_reason` decides, from the plan alone, whether an RL step needs its
old-policy log-prob pass: an on-policy update (one epoch, one minibatch) sees the old log-probs
equal to its own forward's, so the pass is redundant and the update uses its own (detached)
log-probs as the old ones (ratio exactly 1). The pass stays whenever the update is off-policy,
whenever something needs the old log-probs before the update (``kl_mode: penalty`` puts their KL
into the rewards), when dropout makes the update's (training-mode) forward differ from the
pass's (eval-mode) one, or when the plan forces it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PPOUpdateConfig:
    """How one rollout batch is turned into optimizer steps."""

    ppo_epochs: int = 1
    """Passes over the rollout batch (>= 1)."""
    num_minibatches: int = 1
    """Optimizer steps per epoch; must divide the batch size (>= 1)."""
    micro_batch_size: int = 1
    """Sequences per Megatron microbatch on one DP rank; must divide the per-rank minibatch."""
    packing: bool = False
    """Pack each microbatch's sequences into one row without padding (THD ``packed_seq_params``;
    :mod:`megatron_rlhf.models.packing`) for the update and the no-grad passes (actor and critic
    log-probs/values, reference log-probs). Off: full sequences right-padded to the longest of
    the share. Same loss, gradient and weights either way up to float summation order."""
    max_tokens_per_microbatch: int = 0
    """Token budget (prompt + response tokens) of one microbatch on one DP rank when ``packing``:
    microbatches are filled first-fit decreasing up to it (a longer sample gets one of its own),
    and ``micro_batch_size`` is then not used. 0: ``micro_batch_size`` samples per microbatch.
    Needs ``packing: true`` (>= 0)."""
    force_old_logprob_pass: bool = False
    """Run the old-policy log-prob pass even when the update is on-policy (by default an on-policy
    update skips it and takes the old log-probs from its own forward; see
    :func:`old_logprob_pass_reason`). For comparisons with the plain path."""

    def __post_init__(self) -> None:
        for name in ("ppo_epochs", "num_minibatches", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOUpdateConfig.{name}={getattr(self, name)} must be >= 1")
        if self.max_tokens_per_microbatch < 0:
            raise ValueError(f"PPOUpdateConfig.max_tokens_per_microbatch={self.max_tokens_per_microbatch} must be >= 0")
        if self.max_tokens_per_microbatch and not self.packing:
            raise ValueError(f"PPOUpdateConfig.max_tokens_per_microbatch={self.max_tokens_per_microbatch} needs "
                             "packing: true (a token budget makes microbatches of different sizes)")


def update_is_on_policy(update: PPOUpdateConfig) -> bool:
    """Whether each optimizer step sees the policy that produced the batch (one epoch, one minibatch)."""
    return update.ppo_epochs == 1 and update.num_minibatches == 1


def old_logprob_pass_reason(update: PPOUpdateConfig, kl_mode: str, dropout: float = 0.0) -> str | None:
    """Why a step must run the old-policy log-prob pass before the update; None when it may skip it.

    ``kl_mode``: the algorithm's (``AlgorithmConfig.kl_mode``); ``dropout``: the actor model's
    largest dropout probability (hidden or attention). Pure: decided from the plan alone.
    """
    if update.force_old_logprob_pass:
        return "PPOUpdateConfig.force_old_logprob_pass is set"
    if update.ppo_epochs > 1:
        return f"ppo_epochs={update.ppo_epochs} > 1: later epochs are off-policy"
    if update.num_minibatches > 1:
        return f"num_minibatches={update.num_minibatches} > 1: later minibatches are off-policy"
    if kl_mode == "penalty":
        return "kl_mode='penalty' puts the old policy's KL into the rewards before the update"
    if dropout > 0:
        return f"dropout={dropout} makes the update's forward differ from the old policy's"
    return None


def skips_old_logprob_pass(update: PPOUpdateConfig, kl_mode: str, dropout: float = 0.0) -> bool:
    """Whether the step skips its old-policy log-prob pass (:func:`old_logprob_pass_reason` is None)."""
    return old_logprob_pass_reason(update, kl_mode, dropout) is None
