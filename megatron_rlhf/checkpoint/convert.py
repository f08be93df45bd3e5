"""HF <-> Megatron checkpoint conversion, each one call that starts the processes it needs.

- :func:`hf_to_megatron`: builds the model at the requested TP/PP/EP layout in TP*PP*EP local
  processes (or in-process under torchrun with that world size), fills each shard from the HF
  safetensors through ``megatron_rlhf.mapping`` and saves a Megatron distributed checkpoint
  (``megatron_rlhf.checkpoint.dist_ckpt``) with the HF config and tokenizer files.
- :func:`megatron_to_hf`: loads a checkpoint at its saved layout (or another one), streams the
  full tensors in HF naming through the same mapping and writes safetensors, config and tokenizer
  (into ``<out>.partial``, renamed to ``<out>`` once complete).

All validation a user can trip (architecture, layout vs. model shape, missing/corrupt files,
existing output) happens in the calling process before any worker starts. Weights keep their
dtype end to end, so HF -> Megatron -> HF reproduces every tensor bit for bit.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_rlhf.checkpoint.dist_ckpt import (
    CheckpointMetadata,
    check_shard_files,
    prepare_output_dir,
    read_checkpoint_metadata,
)
from megatron_rlhf.checkpoint.hf_io import (
    HFCheckpointError,
    HFWeightReader,
    HFWeightWriter,
    copy_side_files,
)
from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.models.arch import ArchSpec, arch_spec_from_hf_config, load_hf_config
from megatron_rlhf.models.provider import DTYPES, ModelBuildConfig, validate_layout
from megatron_rlhf.parallel.launch import Launcher

log = logging.getLogger(__name__)


def hf_dtype_name(hf_config: dict) -> str:
    """The weight dtype an HF config declares (``dtype`` or ``torch_dtype``), default float32."""
    declared = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return declared if declared in DTYPES else "float32"


def hf_weights_dtype_name(reader: HFWeightReader, hf_config: dict) -> str:
    """The dtype the embedding is stored in; the config's declared dtype if that is unknown.

    The file wins over the config: the model is built in the dtype the weights have, so that
    HF -> Megatron -> HF gives back the same tensors in the same dtype.
    """
    stored = reader.dtype_name("model.embed_tokens.weight")
    declared = hf_dtype_name(hf_config)
    if stored is not None and stored != declared:
        log.warning("%s: config declares %s but the weights are stored as %s; using %s",
                    reader.directory, declared, stored, stored)
    return stored or declared


@dataclass(frozen=True)
class ConversionPlan:
    """Everything a worker needs, validated and picklable."""

    hf_dir: str
    out_dir: str
    arch: ArchSpec
    hf_config: dict
    parallel: ParallelConfig
    build: ModelBuildConfig
    padded_vocab: int

    @property
    def world_size(self) -> int:
        return self.parallel.minimal_world_size


def plan_hf_to_megatron(
    hf_dir: str,
    out_dir: str,
    tensor_parallel: int,
    pipeline_parallel: int,
    expert_parallel: int = 1,
    params_dtype: str | None = None,
    overwrite: bool = False,
) -> ConversionPlan:
    hf_config = load_hf_config(hf_dir)
    arch = arch_spec_from_hf_config(hf_config, source=str(Path(hf_dir) / "config.json"))
    parallel = ParallelConfig(
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        expert_parallel=expert_parallel,
    )
    build = ModelBuildConfig(role="lm", transformer_impl="local")
    padded_vocab = validate_layout(arch, parallel, build)
    reader = HFWeightReader(hf_dir)  # fails early on missing/corrupt safetensors and indexes
    check_hf_tensors_present(reader, arch, build.role)
    build = replace(build, params_dtype=params_dtype or hf_weights_dtype_name(reader, hf_config))
    prepare_output_dir(out_dir, overwrite, inputs=(hf_dir,))
    return ConversionPlan(hf_dir, out_dir, arch, hf_config, parallel, build, padded_vocab)


def check_hf_tensors_present(reader: HFWeightReader, arch: ArchSpec, role: str) -> None:
    """Raise :class:`HFCheckpointError` if a tensor the mapping of ``arch`` needs is absent."""
    from megatron_rlhf.mapping.registry import expand_rules

    needed = {
        name for placed in expand_rules(arch, role) if not placed.rule.optional
        for name in placed.rule.hf
    }
    missing = sorted(needed - set(reader.names()))
    if missing:
        raise HFCheckpointError(
            f"{reader.directory}: {len(missing)} tensors that its config.json implies are not in "
            f"the safetensors files, e.g. {missing[:3]}"
        )


def _hf_to_megatron_worker(plan: ConversionPlan) -> list[str]:
    from megatron_rlhf.checkpoint.dist_ckpt import save_model_checkpoint
    from megatron_rlhf.checkpoint.role_model import HFWeights, load_role_model
    from megatron_rlhf.parallel.init import initialize_parallel

    initialize_parallel(plan.parallel)
    loaded = load_role_model(plan.arch, plan.parallel, plan.build, HFWeights(plan.hf_dir))
    model = loaded.model
    metadata = CheckpointMetadata(
        role=plan.build.role,
        hf_config=plan.hf_config,
        tensor_parallel=plan.parallel.tensor_parallel,
        pipeline_parallel=plan.parallel.pipeline_parallel,
        expert_parallel=plan.parallel.expert_parallel,
        padded_vocab_size=plan.padded_vocab,
        params_dtype=plan.build.params_dtype,
        transformer_impl="local",
    )
    save_model_checkpoint(model, plan.out_dir, metadata, hf_side_dir=plan.hf_dir)
    return list(loaded.left_initialised)


def hf_to_megatron(
    hf_dir: str,
    out_dir: str,
    tensor_parallel: int,
    pipeline_parallel: int,
    expert_parallel: int = 1,
    params_dtype: str | None = None,
    overwrite: bool = False,
    launcher: Launcher | None = None,
) -> None:
    """Convert an HF checkpoint directory into a Megatron distributed checkpoint.

    ``launcher`` runs the worker on the plan's ranks (default: ``run_distributed``, which starts
    them, or runs in-process under torchrun); the distributed tests pass a rank pool's ``run``.
    """
    from megatron_rlhf.parallel.launch import run_distributed

    plan = plan_hf_to_megatron(
        hf_dir, out_dir, tensor_parallel, pipeline_parallel, expert_parallel, params_dtype, overwrite
    )
    start = time.perf_counter()
    log.info("converting %s -> %s at %s (%d processes)", hf_dir, out_dir,
             plan.parallel.describe(), plan.world_size)
    (launcher or run_distributed)(_hf_to_megatron_worker, plan.world_size, plan)
    log.info("saved %s in %.1f s", out_dir, time.perf_counter() - start)


@dataclass(frozen=True)
class ExportPlan:
    ckpt_dir: str
    out_dir: str | None
    arch: ArchSpec
    metadata: CheckpointMetadata
    parallel: ParallelConfig
    build: ModelBuildConfig

    @property
    def world_size(self) -> int:
        return self.parallel.minimal_world_size


def plan_checkpoint_load(
    ckpt_dir: str,
    out_dir: str | None = None,
    tensor_parallel: int | None = None,
    pipeline_parallel: int | None = None,
    expert_parallel: int | None = None,
    overwrite: bool = False,
) -> ExportPlan:
    """Validate a checkpoint and the layout to load it at (default: the saved one)."""
    metadata = read_checkpoint_metadata(ckpt_dir)
    check_shard_files(ckpt_dir)
    arch = arch_spec_from_hf_config(metadata.hf_config, source=f"{ckpt_dir}/megatron_rlhf.json")
    parallel = ParallelConfig(
        tensor_parallel=tensor_parallel or metadata.tensor_parallel,
        pipeline_parallel=pipeline_parallel or metadata.pipeline_parallel,
        expert_parallel=expert_parallel or metadata.expert_parallel,
    )
    build = ModelBuildConfig(
        role=metadata.role,
        transformer_impl="local",
        params_dtype=metadata.params_dtype,
        padded_vocab_size=metadata.padded_vocab_size,
    )
    validate_layout(arch, parallel, build)
    if out_dir is not None:
        prepare_output_dir(out_dir, overwrite, inputs=(ckpt_dir,))
    return ExportPlan(ckpt_dir, out_dir, arch, metadata, parallel, build)


def load_checkpoint_model(plan: ExportPlan):
    """In a worker: initialise parallel state, build this stage and load its shards."""
    from megatron_rlhf.checkpoint.role_model import MegatronCheckpoint, load_role_model
    from megatron_rlhf.parallel.init import initialize_parallel

    state = initialize_parallel(plan.parallel)
    return state, load_role_model(plan.arch, plan.parallel, plan.build, MegatronCheckpoint(plan.ckpt_dir)).model


def _megatron_to_hf_worker(plan: ExportPlan) -> int:
    import torch

    from megatron_rlhf.mapping.engine import export_hf_weights

    state, model = load_checkpoint_model(plan)
    assert plan.out_dir is not None
    out_dir = Path(plan.out_dir)
    # Written next to the output and renamed at the end: the output holds a complete model or
    # is left as it was, and --overwrite never leaves stale shards of an earlier export behind.
    partial = out_dir.with_name(out_dir.name + ".partial")
    writer = HFWeightWriter(partial) if state.rank == 0 else None
    # Megatron keeps some parameters (the norms) in float32 whatever params_dtype is; the HF
    # files hold every tensor in the model's dtype.
    dtype = DTYPES[plan.build.params_dtype]
    count = 0
    for name, tensor in export_hf_weights(model, plan.arch, plan.build.role):
        if writer is not None:
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        count += 1
    if writer is not None:
        writer.close()
        copy_side_files(Path(plan.ckpt_dir) / "hf", partial)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    torch.distributed.barrier()
    return count


def megatron_to_hf(
    ckpt_dir: str,
    out_dir: str,
    tensor_parallel: int | None = None,
    pipeline_parallel: int | None = None,
    overwrite: bool = False,
    launcher: Launcher | None = None,
) -> None:
    """Write a Megatron checkpoint as an HF directory (safetensors + config + tokenizer).

    ``launcher``: as for :func:`hf_to_megatron`.
    """
    from megatron_rlhf.parallel.launch import run_distributed

    plan = plan_checkpoint_load(ckpt_dir, out_dir, tensor_parallel, pipeline_parallel, None, overwrite)
    if plan.metadata.role != "lm":
        raise ValueError(
            f"{ckpt_dir}: role={plan.metadata.role!r}; only lm checkpoints export to *ForCausalLM"
        )
    start = time.perf_counter()
    counts = (launcher or run_distributed)(_megatron_to_hf_worker, plan.world_size, plan)
    log.info("wrote %d tensors to %s in %.1f s", counts[0], out_dir, time.perf_counter() - start)
