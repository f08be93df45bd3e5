"""The SFT job from files (the body of `megatron-rlhf train-sft`, whose arguments are in
:mod:`megatron_rlhf.cli.train_sft`).

:func:`run_sft` takes an :class:`SFTRunConfig` and validates everything a user can get wrong in
the calling process, before any rank starts: the HF model and its layout (TP/PP must split it),
the batch split (global batch a multiple of DP x micro batch), the data files (each malformed
line reported as ``file:line: reason``) and the output directory. It then runs TP x PP x DP ranks
(spawned locally on gloo/NCCL, or in-process under torchrun when RANK/WORLD_SIZE are set), which
load the HF weights, train with :func:`megatron_rlhf.trainer.sft.train_sft` and write into
``out_dir``:

* ``checkpoint/``: Megatron distributed checkpoint (model weights; loads at any TP/PP),
* ``hf/``: the trained model as a Hugging Face directory (safetensors, config, tokenizer with
  its chat template) that transformers and vLLM load,
* ``sft_report.json``: every step's loss, grad norm, LR and tokens, and the validation losses.

Each directory is written under ``<name>.partial`` and renamed once complete.

Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTRunConfig:
    """One SFT job from files: model in, checkpoint and HF model out."""

    hf_dir: str
    """Starting model: HF directory (safetensors, config, tokenizer with a chat template)."""
    train_path: str
    """Chat/SFT JSONL (schema in :mod:`megatron_rlhf.data.chat`)."""
    out_dir: str
    """Receives ``checkpoint/``, ``hf/`` and ``sft_report.json`` (module docstring)."""
    validation_path: str | None = None
    """Held-out chat JSONL; None: hold out ``validation_fraction`` of ``train_path``."""
    validation_fraction: float = 0.0
    """Share of ``train_path`` held out (seeded) when there is no validation file; in [0, 0.5]."""
    parallel: Any = None
    """:class:`~megatron_rlhf.config.parallel.ParallelConfig`; None: TP1 PP1."""
    num_processes: int | None = None
    """World size (TP x PP x DP); None: TP x PP, i.e. DP 1."""
    sft: Any = None
    """:class:`~megatron_rlhf.trainer.sft.SFTConfig`; None: its defaults."""
    optimizer: Any = None
    """:class:`~megatron_rlhf.training.megatron_step.OptimizerSettings`; None: its defaults."""
    params_dtype: str | None = None
    """float32 | bfloat16 | float16 weights; None: the dtype the HF weights are stored in."""
    precision: Any = None
    """:class:`~megatron_rlhf.config.precision.PrecisionConfig`; None: ``params_dtype`` decides.
    bf16/fp8 set bfloat16 weights (fp8 builds the Transformer Engine spec)."""
    resources: Any = None
    """:class:`~megatron_rlhf.config.resources.ResourcesConfig`; None: a CPU run."""
    fit_check: Any = None
    """:class:`~megatron_rlhf.planning.fit_check.FitCheckConfig`; None: its defaults (the
    planner's pre-start check, GPU h100 on GPU runs, no override)."""
    export_hf: bool = True
    """Write ``out_dir/hf``."""
    save_checkpoint: bool = True
    """Write ``out_dir/checkpoint``."""
    overwrite: bool = False
    """Replace a non-empty ``out_dir``."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction <= 0.5:
            raise ValueError(f"validation_fraction={self.validation_fraction} must be in [0, 0.5]")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes={self.num_processes} must be >= 1")


@dataclass(frozen=True)
class SFTRunPlan:
    """Everything a rank needs, validated in the calling process; picklable."""

    config: SFTRunConfig
    parallel: Any
    world_size: int
    arch: Any
    build: Any
    sft: Any
    optimizer: Any
    train: list
    """ChatExamples to train on."""
    validation: list
    """ChatExamples to validate on."""
    log_level: int = logging.INFO
    """Level of the progress log lines of rank 0 (spawned ranks start without logging set up)."""


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded ``(train, validation)`` split that holds out ``ceil(fraction * n)`` examples."""
    from megatron_rlhf.trainer.sft import epoch_order

    held = math.ceil(fraction * len(examples)) if fraction > 0 else 0
    chosen = set(epoch_order(len(examples), seed, epoch=-1)[:held])
    return (
        [example for index, example in enumerate(examples) if index not in chosen],
        [example for index, example in enumerate(examples) if index in chosen],
    )


def plan_sft_run(
    config: SFTRunConfig, train_examples: list | None = None, validation_examples: list | None = None
) -> SFTRunPlan:
    """Validate the job (model, layout, batch split, data, output directory) before any rank starts.

    ``train_examples`` / ``validation_examples`` (ChatExamples built by the caller, e.g. the GenRM
    trainer) replace reading ``config.train_path`` / ``config.validation_path``.
    """
    from megatron_rlhf.checkpoint.convert import hf_weights_dtype_name
    from megatron_rlhf.config.errors import UserError
    from megatron_rlhf.checkpoint.dist_ckpt import prepare_output_dir
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.data.chat import read_chat_jsonl
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir, load_hf_config
    from megatron_rlhf.models.provider import ModelBuildConfig, validate_layout
    from megatron_rlhf.training.megatron_step import OptimizerSettings
    from megatron_rlhf.trainer.sft import SFTConfig

    parallel = config.parallel or ParallelConfig()
    sft = config.sft or SFTConfig()
    world_size = config.num_processes or parallel.model_parallel
    data_parallel = parallel.data_parallel(world_size)
    if sft.global_batch_size % (data_parallel * sft.micro_batch_size):
        raise UserError(
            f"global_batch_size={sft.global_batch_size} must be a multiple of data_parallel="
            f"{data_parallel} x micro_batch_size={sft.micro_batch_size}"
        )
    arch = arch_spec_from_hf_dir(config.hf_dir)
    reader = HFWeightReader(config.hf_dir)
    dtype = config.params_dtype or hf_weights_dtype_name(reader, load_hf_config(config.hf_dir))
    build = _precision_build(config, dtype, world_size, ModelBuildConfig)
    validate_layout(arch, parallel, build)
    from megatron_rlhf.planning.fit_check import check_sft_config_fits

    check_sft_config_fits(config, parallel, world_size, sft, dtype, arch.max_position_embeddings)
    train = train_examples if train_examples is not None else read_chat_jsonl(config.train_path).records
    if validation_examples is not None:
        validation = validation_examples
    elif config.validation_path is not None:
        validation = read_chat_jsonl(config.validation_path).records
    else:
        train, validation = split_validation(train, config.validation_fraction, sft.seed)
    if len(train) < sft.global_batch_size:
        raise UserError(
            f"{config.train_path}: {len(train)} training conversations do not fill one global batch "
            f"of global_batch_size={sft.global_batch_size}"
        )
    if sft.max_length is not None and sft.max_length > arch.max_position_embeddings:
        raise UserError(
            f"max_length={sft.max_length} exceeds max_position_embeddings="
            f"{arch.max_position_embeddings} of {config.hf_dir}"
        )
    _check_tokenizer(config.hf_dir, train[0], sft.max_length or arch.max_position_embeddings)
    if int(os.environ.get("RANK", "0")) == 0:
        prepare_output_dir(config.out_dir, config.overwrite, inputs=(config.hf_dir,))
    optimizer = config.optimizer or OptimizerSettings()
    level = logging.getLogger().getEffectiveLevel()
    return SFTRunPlan(
        config, parallel, world_size, arch, build, sft, optimizer, train, validation, level
    )


def _precision_build(config: SFTRunConfig, dtype: str, world_size: int, build_class: type) -> Any:
    """The model build for the run's precision (the local spec unless fp8 needs TE), checked
    against this machine and the resources before any rank starts."""
    from megatron_rlhf.config.precision import validate_precision_environment

    if config.resources is not None:
        config.resources.check_fits(world_size, f"train-sft with {world_size} processes")
    if config.precision is None or config.precision.mode == "fp32":
        return build_class(role="lm", transformer_impl="local", params_dtype=dtype, precision=config.precision)
    validate_precision_environment(config.precision)
    impl = "transformer_engine" if config.precision.uses_transformer_engine else "local"
    return build_class(role="lm", transformer_impl=impl, params_dtype=config.precision.params_dtype,
                       precision=config.precision)


def _check_tokenizer(hf_dir: str, example: Any, max_length: int) -> None:
    """Fail before training if the tokenizer cannot render and mask ``example`` (no chat
    template, not a fast tokenizer, a template that rewrites earlier turns)."""
    from transformers import AutoTokenizer

    from megatron_rlhf.config.errors import UserError
    from megatron_rlhf.data.chat import tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"{hf_dir}: the tokenizer has no chat template; SFT needs one")
    tokenize_chat(tokenizer, example, max_length)


def _sft_worker(plan: SFTRunPlan):
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from megatron_rlhf.checkpoint.dist_ckpt import CheckpointMetadata, save_model_checkpoint
    from megatron_rlhf.checkpoint.hf_export import save_hf_directory
    from megatron_rlhf.checkpoint.role_model import HFWeights, load_role_model
    from megatron_rlhf.models.arch import load_hf_config
    from megatron_rlhf.models.provider import DTYPES
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.trainer.sft import train_sft

    config = plan.config
    state = initialize_parallel(plan.parallel, seed=plan.sft.seed)
    if state.rank == 0 and not logging.getLogger().handlers:
        logging.basicConfig(
            level=plan.log_level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    loaded = load_role_model(plan.arch, plan.parallel, plan.build, HFWeights(config.hf_dir), state.device)
    model, padded = loaded.model, loaded.padded_vocab
    tokenizer = AutoTokenizer.from_pretrained(config.hf_dir)
    report = train_sft(
        model, plan.arch, tokenizer, plan.train, plan.sft, plan.optimizer, plan.validation
    )
    out = Path(config.out_dir)
    if config.save_checkpoint:
        metadata = CheckpointMetadata(
            role="lm",
            hf_config=load_hf_config(config.hf_dir),
            tensor_parallel=plan.parallel.tensor_parallel,
            pipeline_parallel=plan.parallel.pipeline_parallel,
            expert_parallel=plan.parallel.expert_parallel,
            padded_vocab_size=padded,
            params_dtype=plan.build.params_dtype,
            transformer_impl=plan.build.transformer_impl,
        )
        save_model_checkpoint(model, out / "checkpoint", metadata, hf_side_dir=config.hf_dir)
    if config.export_hf:
        dtype = DTYPES[plan.build.params_dtype]
        save_hf_directory(model, plan.arch, config.hf_dir, out / "hf", role="lm", dtype=dtype)
    if state.rank == 0:
        summary = {
            **asdict(report),
            "initial_validation_loss": report.initial_validation_loss,
            "final_validation_loss": report.final_validation_loss,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "sft_report.json").write_text(json.dumps(summary, indent=2))
    return report


def run_sft(
    config: SFTRunConfig, train_examples: list | None = None, validation_examples: list | None = None
):
    """Run the SFT job; returns global rank 0's :class:`~megatron_rlhf.trainer.sft.SFTReport`.

    Optional pre-built examples as in :func:`plan_sft_run`.
    """
    from megatron_rlhf.parallel.launch import run_distributed

    plan = plan_sft_run(config, train_examples, validation_examples)
    log.info(
        "SFT of %s on %s: %d train / %d validation conversations, %s x DP%d (%d processes)",
        config.hf_dir, config.train_path, len(plan.train), len(plan.validation),
        plan.parallel.describe(), plan.world_size // plan.parallel.model_parallel, plan.world_size,
    )
    return run_distributed(_sft_worker, plan.world_size, plan)[0]
