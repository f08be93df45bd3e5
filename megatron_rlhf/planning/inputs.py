"""The planner's inputs from a flat mapping of settings: command-line flags (``megatron-rlhf plan``)
laid over a recipe's or a trainer's settings (``planning.fit_check``). Pure: no torch import."""

from __future__ import annotations

from typing import Any


def plan_inputs_from_flags(args: Any, base: dict | None = None):
    """(layout, request, gpu) from the flags, on top of ``base`` (a recipe's settings)."""
    from megatron_rlhf.planning.hardware import gpu_spec
    from megatron_rlhf.planning.layout import PlanLayout
    from megatron_rlhf.planning.plan import PlanRequest, RolloutSettings, activation_dtype_bytes
    from megatron_rlhf.planning.state_bytes import TrainingPrecision

    settings = dict(base or {})

    def pick(name: str, default):
        value = getattr(args, name, None)
        return value if value is not None else settings.get(name, default)

    layout = PlanLayout(
        tensor_parallel=pick("tp", 1), pipeline_parallel=pick("pp", 1), context_parallel=pick("cp", 1),
        data_parallel=pick("dp", 1), expert_parallel=pick("ep", 1), expert_tensor_parallel=pick("etp", None),
        sequence_parallel=bool(pick("sequence_parallel", False)),
        first_stage_layers=pick("first_stage_layers", None), last_stage_layers=pick("last_stage_layers", None),
    )
    params_dtype = pick("params_dtype", "bf16")
    precision = TrainingPrecision(
        params_dtype=params_dtype,
        norm_dtype="fp32" if pick("transformer_impl", "transformer_engine") == "local" else None,
        grad_dtype=pick("grad_dtype", "fp32"), optimizer=pick("optimizer", "adam"),
        distributed_optimizer=not getattr(args, "no_distributed_optimizer", False)
        and settings.get("distributed_optimizer", True),
    )
    seq_len = pick("seq_len", 4096)
    engine_tp = pick("engine_tp", None)
    rollout = None
    if engine_tp is not None:
        rollout = RolloutSettings(
            engine_tensor_parallel=engine_tp,
            sequences_per_engine=pick("rollout_sequences", 64),
            max_sequence_tokens=pick("rollout_tokens", None) or seq_len,
            weight_bytes=pick("engine_weight_bytes", 1 if pick("fp8_rollout", False) else 2),
            kv_bytes=1 if pick("kv_fp8", False) else 2,
            colocated=not pick("disaggregated", False),
            memory_fraction=pick("engine_memory_fraction", 0.9),
        )
    critic = bool(pick("critic", False))
    trained = pick("trained_models", 2 if critic else 1)
    request = PlanRequest(
        seq_len=seq_len, micro_batch=pick("micro_batch", 1), microbatches=pick("microbatches", None),
        recompute=pick("recompute", "none"), precision=precision,
        activation_bytes=activation_dtype_bytes(params_dtype), role=pick("role", "lm"),
        trained_models=trained, frozen_models=1 if pick("reference", False) else 0,
        rollout=rollout, sync_bucket_bytes=_bucket_bytes(args, settings),
        offload=pick("offload", "none"), gpus_per_node=pick("gpus_per_node", 8),
    )
    memory = getattr(args, "gpu_memory_gib", None) or settings.get("gpu_memory_gib")
    reserve = getattr(args, "reserve_gib", None)
    gpu = gpu_spec(pick("gpu", "h100") if memory is None else getattr(args, "gpu", None), memory,
                   settings.get("reserve_gib", 5.0) if reserve is None else reserve)
    return layout, request, gpu



def _bucket_bytes(args: Any, settings: dict) -> int:
    mib = getattr(args, "sync_bucket_mib", None)
    return mib * 1024**2 if mib is not None else settings.get("sync_bucket_bytes", 64 * 1024**2)
