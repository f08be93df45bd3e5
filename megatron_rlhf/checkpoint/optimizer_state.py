"""Model and optimizer state for Megatron-Core distributed checkpoints, exact on round trip.

:func:`sharded_state` is what :mod:`megatron_rlhf.checkpoint.train_state` saves and loads for one
component: the model's sharded state dict and, for a ``MegatronUpdater``, its optimizer's, with
the distributed optimizer in the ``dp_reshardable`` format. Megatron-Core 0.16 with torch's
Adam/SGD (no Apex/Transformer Engine) needs three corrections to round-trip optimizer state
bit for bit; they are here, each with the defect it mends:

- a never-stepped optimizer has no state to save or load into (:func:`materialise_optimizer_state`);
- a non-distributed checkpoint saved before the first step lacks Adam's step 0, and the
  distributed optimizer loads one shared step then overwrites it with the template's 0
  (:func:`saved_adam_steps` before the load, :func:`restore_adam_steps` after it).
"""

from __future__ import annotations

from typing import Any

import torch

OPTIMIZER_SHARDING = "dp_reshardable"


def is_updater(component: Any) -> bool:
    return all(
        hasattr(component, name) for name in ("model", "optimizer", "scheduler", "skipped_steps")
    )


def module_of(component: Any) -> torch.nn.Module:
    """The model whose ``sharded_state_dict`` is saved (a DDP wrapper unwrapped)."""
    model = component.model if is_updater(component) else component
    return model.module if hasattr(model, "ddp_config") else model


def sharded_state(component: Any, is_loading: bool) -> dict[str, Any]:
    metadata = {
        "distrib_optim_sharding_type": OPTIMIZER_SHARDING,
        "chained_optim_avoid_prefix": True,
    }
    model_state = module_of(component).sharded_state_dict(metadata=metadata)
    if not is_updater(component):
        return {"model": model_state}
    materialise_optimizer_state(component.optimizer)
    optimizer_state = component.optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=metadata
    )
    return {"model": model_state, "optimizer": optimizer_state}


# Megatron-Core 0.16 with torch's Adam/SGD (no Apex/Transformer Engine: CPU, some GPU installs)
# needs three corrections to round-trip optimizer state exactly.


def inner_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed_optimizer(optimizer: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(inner, DistributedOptimizer) for inner in inner_optimizers(optimizer))


def materialise_optimizer_state(optimizer: Any) -> None:
    """Create the zero state torch makes at a first step (Adam: moments, step 0; SGD: momentum
    buffers) in a never-stepped optimizer: Megatron can neither save an empty torch Adam state
    nor load into one. A zero SGD buffer gives the first step (dampening 0) the same update, bit
    for bit, as a missing one; Megatron's SGD lacks the state initialiser that loading calls, so
    a no-op one is set (the state exists by then)."""
    for inner in inner_optimizers(optimizer):
        torch_optimizer = inner.optimizer
        if isinstance(torch_optimizer, torch.optim.SGD):
            inner.init_state_fn = inner.init_state_fn or (lambda *args, **kwargs: None)
            for group in torch_optimizer.param_groups:
                for parameter in group["params"] if group["momentum"] else []:
                    torch_optimizer.state[parameter].setdefault(
                        "momentum_buffer", torch.zeros_like(parameter)
                    )
        elif inner.init_state_fn is not None and len(torch_optimizer.state) == 0:
            inner.init_state_fn(torch_optimizer, inner.config)
            if isinstance(torch_optimizer, torch.optim.Adam):  # Apex/TE Adam keep no "step"
                for parameter_state in torch_optimizer.state.values():
                    parameter_state.setdefault("step", torch.tensor(0.0))


def saved_adam_steps(optimizer: Any, loaded: Any) -> list[float | None]:
    """Per chained optimizer, the Adam step of a distributed-optimizer checkpoint (None else).

    Also puts back step 0 where a non-distributed checkpoint saved before the first step lacks
    it (Megatron saves the common step only when it is non-zero)."""
    inners = inner_optimizers(optimizer)
    steps: list[float | None] = []
    for inner, state in zip(
        inners,
        [loaded] if len(inners) == 1 else [loaded[i] for i in range(len(inners))],
    ):
        if "param_state" in state:
            found = {group.get("step") for group in state["optimizer"]["param_groups"]} - {None}
            steps.append(float(found.pop()) if len(found) == 1 else None)
            continue
        steps.append(None)
        torch_state = state.get("optimizer", state).get("state", {})
        if "common_step" not in torch_state and isinstance(inner.optimizer, torch.optim.Adam):
            for parameter_state in torch_state.values():
                parameter_state.setdefault("step", torch.tensor(0.0))
    return steps


def restore_adam_steps(optimizer: Any, saved_steps: list[float | None]) -> None:
    """Give every parameter its own, correct Adam ``step`` after a load. The distributed
    optimizer loads one ``step`` tensor shared by all parameters, then overwrites it with the
    loading template's 0; torch Adam would also add 1 to a shared tensor once per parameter."""
    for inner, step in zip(inner_optimizers(optimizer), saved_steps):
        for parameter_state in inner.optimizer.state.values():
            current = parameter_state.get("step")
            if isinstance(current, torch.Tensor):
                value = current if step is None else torch.tensor(step, dtype=current.dtype)
                parameter_state["step"] = value.clone()
