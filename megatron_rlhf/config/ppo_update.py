"""How one rollout batch is turned into optimizer steps (a light value type).

Kept apart from :mod:`megatron_rlhf.trainer.ppo_update` (the heavy update machinery) so that
configs and workers can name the plan without importing the trainer. Guarantees: an instance is
validated on construction (a bad value raises ``ValueError`` naming it); whether the plan divides
a given batch is checked where the batch is known.

There is no temperature here: the log-probs of the actor and the reference are computed at the
sampling temperature of the run (``RLConfig.temperature``), the one the engine samples at, so the
PPO ratio and the weight-sync check compare the same distribution.
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

    def __post_init__(self) -> None:
        for name in ("ppo_epochs", "num_minibatches", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOUpdateConfig.{name}={getattr(self, name)} must be >= 1")
