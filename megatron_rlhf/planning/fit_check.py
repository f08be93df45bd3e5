"""The fit check every trainer runs before it starts processes, and recipes' plan settings.

:func:`check_fits` plans a layout and raises :class:`DoesNotFit` (a ``ValueError``, so the CLI
exits 2 in seconds) when the peak exceeds the GPU, naming the phase and component, unless the
run sets the explicit override (``fit_check.allow_unfit``), which logs the same message as a
warning and goes on. Runs without GPUs (CPU test machines) are planned and their layout
validated, but have no GPU memory to fit unless ``fit_check.gpu`` or ``gpu_memory_gib`` is set.

:func:`rl_plan_settings` turns an RL run's typed config into the planner's settings (the same
keys as the ``plan`` command's flags).
Planning assumptions for an RL run: the critic (PPO) and the reference share the actor's GPUs
and layout; the rollout batch (``prompts_per_step x n`` sequences of ``max_prompt_tokens +
max_new_tokens``) is split evenly over the engines (``rollout_engines`` when disaggregated), each
caching at most vLLM's default ``max_num_seqs`` (256) sequences at once.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rlhf.config.errors import ConfigError, MissingInput, UserError

log = logging.getLogger(__name__)

VLLM_MAX_NUM_SEQS = 256
"""vLLM's default ``max_num_seqs``: sequences an engine runs (and caches) at once; the rest of
a larger rollout batch waits in its queue."""


class DoesNotFit(UserError):
    """The planned peak memory exceeds the GPU's usable memory."""


@dataclass(frozen=True)
class FitCheckConfig:
    """The pre-start fit check of a trainer (the ``fit_check`` section of a run config)."""

    enabled: bool = True
    """Run the planner before any process starts (it also validates the layout)."""
    gpu: str | None = None
    """h100 | h200: the GPU to fit; None: none named (GPU runs then assume h100; CPU runs get no
    memory verdict)."""
    gpu_memory_gib: float | None = None
    """GPU memory in GiB instead of a named GPU."""
    reserve_gib: float = 5.0
    """GiB per GPU held back for the CUDA context, NCCL and fragmentation. >= 0."""
    hf_config: str | None = None
    """config.json to plan with when the policy directory's own is not readable at plan time
    (a recipe checked before the checkpoint is downloaded). Relative to the working directory."""
    offload: str = "none"
    """none | optimizer | all: what the run keeps in host memory outside training."""
    allow_unfit: bool = False
    """The explicit override: start even when the planner says the layout does not fit."""

    def __post_init__(self) -> None:
        if self.gpu is not None and self.gpu not in ("h100", "h200"):
            raise ConfigError(f"fit_check.gpu={self.gpu!r} (choose h100 or h200)")
        if self.offload not in ("none", "optimizer", "all"):
            raise ConfigError(f"fit_check.offload={self.offload!r} (choose none, optimizer or all)")
        if self.reserve_gib < 0:
            raise ConfigError(f"fit_check.reserve_gib={self.reserve_gib} must be >= 0")


def read_architecture(model_dir: str, fallback: str | None) -> tuple[dict, str]:
    """HF config dict of ``model_dir`` (or of ``fallback`` when the directory has none)."""
    candidates = [Path(model_dir) / "config.json"] + ([Path(fallback)] if fallback else [])
    for path in candidates:
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text()), str(path)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    raise MissingInput(
        f"no config.json in {model_dir} and fit_check.hf_config is {fallback!r}: the planner needs "
        "the model's architecture"
    )


def layout_settings(parallel: Any, world_size: int) -> dict[str, Any]:
    """Planner settings of a ParallelConfig at ``world_size`` ranks."""
    dp = parallel.data_parallel(world_size)
    recompute = getattr(parallel, "recompute_granularity", None) or "none"
    return {
        "tp": parallel.tensor_parallel, "pp": parallel.pipeline_parallel,
        "cp": parallel.context_parallel, "ep": parallel.expert_parallel,
        "etp": parallel.expert_tensor_parallel, "dp": dp,
        "sequence_parallel": parallel.sequence_parallel, "recompute": recompute,
        "first_stage_layers": getattr(parallel, "num_layers_in_first_pipeline_stage", None),
        "last_stage_layers": getattr(parallel, "num_layers_in_last_pipeline_stage", None),
    }


def precision_settings(config: Any) -> dict[str, Any]:
    """params dtype and layer spec from a run's ``precision`` / ``resources`` sections, if any."""
    precision = getattr(config, "precision", None)
    mode = getattr(precision, "mode", "fp32")
    resources = getattr(config, "resources", None)
    gpus_per_node = getattr(resources, "gpus_per_node", 0)
    return {
        "params_dtype": "fp32" if mode == "fp32" else "bf16",
        "transformer_impl": "transformer_engine" if gpus_per_node else "local",
        "gpus_per_node": gpus_per_node or 8,
        "on_gpus": bool(gpus_per_node),
    }


def fit_settings(fit: FitCheckConfig, on_gpus: bool) -> dict[str, Any]:
    settings: dict[str, Any] = {"offload": fit.offload, "reserve_gib": fit.reserve_gib}
    if fit.gpu_memory_gib is not None:
        settings["gpu_memory_gib"] = fit.gpu_memory_gib
    elif fit.gpu is not None or on_gpus:
        settings["gpu"] = fit.gpu or "h100"
    return settings


def rl_plan_settings(config: Any) -> tuple[dict, str, dict[str, Any]]:
    """(HF config, its path, planner settings) of an :class:`RLConfig`."""
    fit = getattr(config, "fit_check", None) or FitCheckConfig()
    hf_config, source = read_architecture(config.policy_dir, fit.hf_config)
    settings = layout_settings(config.actor.parallel, config.actor.world_size)
    settings.update(precision_settings(config))
    seq_len = config.max_prompt_tokens + config.max_new_tokens
    update = config.update
    per_rank = config.prompts_per_step * config.n // update.num_minibatches // settings["dp"]
    disaggregated = config.placement == "disaggregated"
    # colocated: one engine, in the actor's rank 0; disaggregated: one per entry of rollout_engines
    engines = tuple(getattr(config, "rollout_engines", ()) or (config.engine_tensor_parallel,))
    sequences = math.ceil(config.prompts_per_step * config.n / len(engines))
    resources = getattr(config, "resources", None)
    settings.update(
        seq_len=seq_len, micro_batch=update.micro_batch_size,
        microbatches=max(1, math.ceil(per_rank / update.micro_batch_size)),
        critic=config.algorithm.needs_critic, reference=True,
        engine_tp=min(engines), disaggregated=disaggregated,
        rollout_sequences=min(sequences, VLLM_MAX_NUM_SEQS), rollout_tokens=seq_len,
        engine_weight_bytes=4 if settings["params_dtype"] == "fp32" else 2,
        engine_memory_fraction=getattr(resources, "gpu_memory_utilization", 0.9),
        sync_bucket_bytes=config.weight_sync_bucket_bytes,
    )
    settings.update(fit_settings(fit, settings["on_gpus"]))
    return hf_config, source, settings


def plan_from_settings(hf_config: dict, source: str, settings: dict[str, Any]):
    """The :class:`~megatron_rlhf.planning.plan.Plan` of planner ``settings``."""
    from types import SimpleNamespace

    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.planning.plan import compute_plan
    from megatron_rlhf.planning.inputs import plan_inputs_from_flags

    flags = SimpleNamespace()
    arch = arch_spec_from_hf_config(hf_config, source)
    layout, request, gpu = plan_inputs_from_flags(flags, settings)
    return compute_plan(arch, layout, request, gpu)


def check_fits(hf_config: dict, source: str, settings: dict[str, Any], what: str,
               allow_unfit: bool = False):
    """Plan ``settings``; raise :class:`DoesNotFit` when a GPU run's peak exceeds its GPU.

    Returns the plan (None memory verdict on runs that name no GPU). Layout errors raise
    :class:`~megatron_rlhf.planning.layout.LayoutError`.
    """
    from megatron_rlhf.planning.report import summary_line

    plan = plan_from_settings(hf_config, source, settings)
    has_gpu = "gpu" in settings or "gpu_memory_gib" in settings
    log.info("fit planner for %s: %s", what, summary_line(plan) if has_gpu else "layout valid (no GPU to fit)")
    if has_gpu and not plan.fits:
        message = (f"{what}: the layout does not fit: {plan.overflow()}. Run `megatron-rlhf plan` "
                   "for the table; change the layout, or set fit_check.allow_unfit: true to start anyway")
        if not allow_unfit:
            raise DoesNotFit(message)
        log.warning("%s (fit_check.allow_unfit is set: starting anyway)", message)
    return plan


def rl_group_settings(config: Any) -> list[tuple[str, dict, str, dict[str, Any]]]:
    """(group name, HF config, source, settings) of every GPU group of an RL run: the actor (with
    the reference and critic when colocated), and under disaggregated placement the reference
    and the critic on GPUs of their own."""
    hf_config, source, actor = rl_plan_settings(config)
    groups = [("actor", hf_config, source, actor)]
    if config.placement != "disaggregated":
        return groups
    actor.update(reference=False, critic=False)
    reference = {**actor, **layout_settings(config.reference.parallel, config.reference.world_size),
                 "engine_tp": None, "trained_models": 0, "reference": True}
    groups.append(("reference", hf_config, source, reference))
    if config.algorithm.needs_critic:
        critic = {**actor, **layout_settings(config.critic.parallel, config.critic.world_size),
                  "engine_tp": None, "role": "value"}
        groups.append(("critic", hf_config, source, critic))
    return groups


def check_rl_config_fits(config: Any) -> list:
    """The RL trainer's pre-start check of every GPU group (skipped when ``fit_check.enabled`` is
    false); returns the plans."""
    fit = getattr(config, "fit_check", None) or FitCheckConfig()
    if not fit.enabled:
        return []
    return [check_fits(hf_config, source, settings, f"train-rl {name} group", fit.allow_unfit)
            for name, hf_config, source, settings in rl_group_settings(config)]


def rm_plan_settings(config: Any, world_size: int | None = None,
                     hf_config_path: str | None = None) -> tuple[dict, str, dict[str, Any]]:
    """(HF config, its path, planner settings) of a ``train-rm`` config (ORM or PRM)."""
    fit = getattr(config, "fit_check", None) or FitCheckConfig()
    hf_config, source = read_architecture(config.model, hf_config_path or fit.hf_config)
    parallel = config.parallel
    world = world_size or parallel.world_size(config.data_parallel)
    settings = layout_settings(parallel, world)
    settings.update(precision_settings(config))
    training = config.training
    settings.update(
        seq_len=config.tokenization.max_length, role=config.role, entropy=False,
        micro_batch=max(2 * training.pairs_per_microbatch, training.responses_per_microbatch),
        microbatches=training.microbatches_per_step,
    )
    settings.update(fit_settings(fit, settings["on_gpus"]))
    return hf_config, source, settings


def check_rm_config_fits(config: Any, world_size: int):
    """The reward-model trainer's pre-start check (skipped when ``fit_check.enabled`` is false)."""
    fit = getattr(config, "fit_check", None) or FitCheckConfig()
    if not fit.enabled:
        return None
    hf_config, source, settings = rm_plan_settings(config, world_size)
    return check_fits(hf_config, source, settings, f"train-rm ({config.role})", fit.allow_unfit)


def check_sft_config_fits(config: Any, parallel: Any, world_size: int, sft: Any, dtype: str,
                          max_positions: int):
    """The SFT / GenRM trainer's pre-start check: ``config`` is an ``SFTRunConfig`` (its
    ``fit_check`` section, when set, names the GPU and the override)."""
    fit = getattr(config, "fit_check", None) or FitCheckConfig()
    if not fit.enabled:
        return None
    hf_config, source = read_architecture(config.hf_dir, fit.hf_config)
    settings = layout_settings(parallel, world_size)
    settings.update(precision_settings(config))
    if getattr(config, "precision", None) is None:
        settings["params_dtype"] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, "bf16")
    data_parallel = settings["dp"]
    settings.update(
        seq_len=sft.max_length or max_positions, micro_batch=sft.micro_batch_size, entropy=False,
        microbatches=max(1, sft.global_batch_size // (data_parallel * sft.micro_batch_size)),
    )
    settings.update(fit_settings(fit, settings["on_gpus"]))
    return check_fits(hf_config, source, settings, "train-sft", fit.allow_unfit)
