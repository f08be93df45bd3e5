"""Optimizer and learning-rate schedule settings of a Megatron trainer (a light value type).

Kept apart from :mod:`megatron_rlhf.training.megatron_step` (which builds Megatron's optimizer from
them) so that configs, workers and tools can name the settings without importing the trainer.
Guarantees: an instance is validated on construction (a bad value raises ``ValueError`` naming
it); it does not check that the model or Megatron version supports the choice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerSettings:
    optimizer: str = "adam"
    """adam (AdamW-style decoupled weight decay) or sgd."""
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    """Momentum of the sgd optimizer (its state is sharded like Adam's)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables clipping (the norm is still computed)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 1
    """Steps over which the LR decays from peak to min_lr (>= 1)."""
    lr_decay_style: str = "constant"
    """constant | linear | cosine."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r} (choose adam or sgd)")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad={self.clip_grad} must be >= 0")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_decay_style={self.lr_decay_style!r} (constant, linear, cosine)")
        if self.optimizer == "sgd" and self.use_distributed_optimizer:
            raise ValueError(
                "optimizer='sgd' with use_distributed_optimizer=True: Megatron's distributed "
                "optimizer supports only adam; set use_distributed_optimizer=False"
            )
        if self.lr_decay_steps < 1 or self.lr_warmup_steps < 0:
            raise ValueError("lr_decay_steps must be >= 1 and lr_warmup_steps >= 0")
