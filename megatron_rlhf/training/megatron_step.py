"""One optimizer step of a Megatron model over microbatches, under any TP/PP/DP layout.

:class:`MegatronUpdater` owns the pieces Megatron-Core training needs around a model: its
``DistributedDataParallel`` wrapper (gradient buffers, DP reduction), the Megatron optimizer
(plain or distributed, with gradient clipping), the learning-rate schedule and the hooks that the
pipeline schedules call (gradient finalisation across DP, tied embeddings and sequence-parallel
norms). :meth:`MegatronUpdater.step` runs forward and backward with Megatron's schedule (1F1B
for PP > 1) and then the optimizer.

Loss contract: ``loss_fn(output, microbatch)`` returns ``(loss, metrics)`` where ``loss`` is the
microbatch's mean loss (a scalar on the last stage). Megatron divides it by the number of
microbatches and DDP averages gradients over data-parallel ranks, so a global batch split into
equal microbatches gives the same gradient at every layout.

Non-finite values: if the loss or any gradient is NaN/Inf on any rank, the step is skipped on all
ranks (no parameter, optimizer state or LR-schedule change) and counted in
``MegatronUpdater.skipped_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megatron_rlhf.config.optimizer import OptimizerSettings

__all__ = ["LossFn", "MegatronUpdater", "OptimizerSettings", "StepResult"]

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepResult:
    loss: float | None
    """Mean loss over this rank's microbatches (last stage; None elsewhere)."""
    grad_norm: float | None
    learning_rate: float
    skipped: bool
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _snapshot_metrics(result: tuple[torch.Tensor, dict[str, torch.Tensor]]):
    """Copy metric tensors: Megatron divides the returned loss in place by the number of
    microbatches, which would also change a metric that is a ``detach()`` view of it."""
    loss, metrics = result
    return loss, {
        name: value.detach().clone() if isinstance(value, torch.Tensor) else value
        for name, value in metrics.items()
    }


class MegatronUpdater:
    """DDP + Megatron optimizer + LR schedule around one pipeline-stage model."""

    def __init__(self, model: torch.nn.Module, settings: OptimizerSettings):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        config = model.config
        self.settings = settings
        self.model = DistributedDataParallel(
            config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                # The layout the provider built the model for (ParallelConfig.overlap_grad_reduce).
                overlap_grad_reduce=bool(getattr(getattr(model, "parallel", None), "overlap_grad_reduce", False)),
                use_distributed_optimizer=settings.use_distributed_optimizer,
            ),
            model,
        )
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer=settings.optimizer,
                lr=settings.lr,
                min_lr=settings.min_lr,
                weight_decay=settings.weight_decay,
                adam_beta1=settings.adam_beta1,
                adam_beta2=settings.adam_beta2,
                adam_eps=settings.adam_eps,
                sgd_momentum=settings.sgd_momentum,
                clip_grad=settings.clip_grad,
                use_distributed_optimizer=settings.use_distributed_optimizer,
                bf16=config.bf16,
                fp16=config.fp16,
                params_dtype=config.params_dtype,
            ),
            [self.model],
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if settings.lr_warmup_steps else settings.lr,
            max_lr=settings.lr,
            min_lr=settings.min_lr,
            lr_warmup_steps=settings.lr_warmup_steps,
            lr_decay_steps=max(settings.lr_decay_steps, settings.lr_warmup_steps + 1),
            lr_decay_style=settings.lr_decay_style,
            start_wd=settings.weight_decay,
            end_wd=settings.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.model.no_sync
        config.grad_scale_func = self.optimizer.scale_loss if config.fp16 else None
        self.skipped_steps = 0
        self.steps = 0

    def _all_finite(self, loss_values: list[float]) -> bool:
        """Whether every loss and gradient is finite on every rank (one host sync in total).

        Checked over the DDP's contiguous gradient buffers (a few ops in all) where this
        megatron-core exposes them, else over each parameter's ``main_grad`` view, by their
        minimum and maximum: one read of the gradients and no allocation (``isfinite(...).all()``
        writes a boolean per element first: 104 ms against 5 ms for 26M fp32 values on 2 cores).
        """
        from megatron_rlhf.parallel.megatron_compat import gradient_buffers

        device = next(self.model.parameters()).device
        finite = torch.tensor(all(math.isfinite(value) for value in loss_values), device=device)
        grads = gradient_buffers(self.model)
        if grads is None:
            grads = [p.main_grad for p in self.model.parameters() if getattr(p, "main_grad", None) is not None]
        for grad in grads:
            if grad.numel():  # min and max are non-finite iff an element is (NaN propagates)
                low, high = torch.aminmax(grad)
                finite &= torch.isfinite(low) & torch.isfinite(high)
        flag = finite.to(torch.float32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def step(self, microbatches: list[dict[str, torch.Tensor]], loss_fn: LossFn) -> StepResult:
        """Forward, backward and optimizer step over this rank's microbatches."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_rlhf.models.forward import run_microbatch
        from megatron_rlhf.models.sequence_padding import schedule_seq_length

        if not microbatches:
            raise ValueError("step() needs at least one microbatch")
        batch_size, seq_length = microbatches[0]["input_ids"].shape

        def forward_step(data_iterator, stage_model):
            microbatch = next(data_iterator)
            output = run_microbatch(stage_model, microbatch)
            return output, lambda output_tensor: _snapshot_metrics(loss_fn(output_tensor, microbatch))

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.model.train()
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(microbatches),
            model=[self.model],
            num_microbatches=len(microbatches),
            seq_length=schedule_seq_length(self.model.config, seq_length),
            micro_batch_size=batch_size,
            forward_only=False,
        )
        losses = [float(metrics["loss"]) for metrics in reduced if "loss" in metrics]
        learning_rate = self.optimizer.param_groups[0]["lr"]
        if not self._all_finite(losses):
            self.skipped_steps += 1
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            return StepResult(None, None, learning_rate, True, list(reduced))
        successful, grad_norm, _ = self.optimizer.step()
        if not successful:  # fp16 loss scaling found an overflow; Megatron did not update
            self.skipped_steps += 1
            return StepResult(None, grad_norm, learning_rate, True, list(reduced))
        self.scheduler.step(increment=1)
        self.steps += 1
        mean_loss = sum(losses) / len(losses) if losses else None
        return StepResult(mean_loss, grad_norm, learning_rate, False, list(reduced))
