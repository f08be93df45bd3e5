"""The reward-model job from a YAML recipe: train an ORM or PRM (`megatron-rlhf train-rm --config
cfg.yaml`, whose arguments are in :mod:`megatron_rlhf.cli.train_rm`).

The YAML file (every section optional except the first four keys; unknown keys are errors)::

    model: path/to/hf_model            # HF directory (weights + tokenizer) to start from
    role: reward                       # reward (ORM) | prm
    train_files: [pairs.jsonl, labelled.jsonl]
    output: runs/rm                    # gets checkpoint/ (Megatron dist ckpt) and metrics.jsonl
    validation_files: [val.jsonl]
    steps: 100                         # optimizer steps
    validate_every: 50                 # 0: validate only after the last step
    seed: 1
    skip_malformed_lines: false        # true: report and skip bad JSONL lines instead of failing
    data_parallel: 1                   # world size = TP * PP * this, when not under torchrun
    parallel: {tensor_parallel: 1, pipeline_parallel: 1}            # ParallelConfig fields
    tokenization: {step_separator: "\\n", prompt_format: chat}      # RewardTokenization fields
    training: {pairs_per_microbatch: 2, responses_per_microbatch: 2,
               microbatches_per_step: 4}                             # RewardTrainingConfig fields
    optimizer: {lr: 1.0e-5, clip_grad: 1.0}                          # OptimizerSettings fields

Relative paths are relative to the YAML file's directory. It runs SPMD: under torchrun every rank runs the job in-process (WORLD_SIZE must fit the layout);
otherwise it starts ``--nproc`` (default TP * PP * data_parallel) local processes. All checks a
user can trip (config, files, malformed lines with file:line, layout, output directory) run before
any model is built. The command prints ``pairwise_accuracy=<v> auc=<v> step_auc=<v>`` last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_rlhf.config.errors import UserError

log = logging.getLogger(__name__)
SECTIONS = ("parallel", "tokenization", "training", "optimizer")


@dataclass(frozen=True)
class TrainRMConfig:
    model: str
    """HF model directory (config, safetensors, tokenizer) the reward model starts from."""
    role: str
    """reward (outcome RM, Bradley-Terry + BCE) or prm (process RM)."""
    train_files: tuple[str, ...]
    """JSONL files of preference pairs / labelled / step-labelled responses (kinds may mix)."""
    output: str
    """Output directory: checkpoint/ and metrics.jsonl."""
    validation_files: tuple[str, ...] = ()
    steps: int = 100
    """Optimizer steps. >= 1."""
    validate_every: int = 0
    """Validate every N steps (and after the last); 0: only after the last. >= 0."""
    seed: int = 1
    skip_malformed_lines: bool = False
    data_parallel: int = 1
    """DP size when the job starts its own processes (not under torchrun). >= 1."""
    parallel: Any = None
    """ParallelConfig."""
    tokenization: Any = None
    """RewardTokenization."""
    training: Any = None
    """RewardTrainingConfig."""
    optimizer: Any = None
    """OptimizerSettings."""
    precision: Any = None
    """PrecisionConfig (megatron_rlhf.config.precision): fp32 keeps the HF weights' dtype; bf16
    and fp8 train with bfloat16 weights (fp8 through the Transformer Engine spec)."""
    resources: Any = None
    """ResourcesConfig (megatron_rlhf.config.resources): nodes, GPUs per node, CPUs per worker."""
    fit_check: Any = None
    """FitCheckConfig (megatron_rlhf.planning.fit_check): the planner's pre-start check."""

    def __post_init__(self) -> None:
        for name in ("model", "output"):  # accept Path objects; keep the config picklable and plain
            object.__setattr__(self, name, str(getattr(self, name)))
        for name in ("train_files", "validation_files"):
            files = getattr(self, name)
            files = (files,) if isinstance(files, (str, os.PathLike)) else files
            object.__setattr__(self, name, tuple(str(path) for path in files))
        defaults = _section_classes()
        for name, cls in defaults.items():  # None: the section's defaults
            if getattr(self, name) is None:
                object.__setattr__(self, name, cls())
            elif not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        from megatron_rlhf.trainer.reward_model import TRAINABLE_ROLES

        if self.role not in TRAINABLE_ROLES:
            raise ValueError(f"role={self.role!r} (choose from {TRAINABLE_ROLES})")
        if not self.train_files:
            raise ValueError("train_files is empty")
        for name, minimum in (("steps", 1), ("validate_every", 0), ("data_parallel", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _section_classes() -> dict[str, type]:
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.config.precision import PrecisionConfig
    from megatron_rlhf.config.resources import ResourcesConfig
    from megatron_rlhf.data.reward_data import RewardTokenization
    from megatron_rlhf.planning.fit_check import FitCheckConfig
    from megatron_rlhf.training.megatron_step import OptimizerSettings
    from megatron_rlhf.trainer.reward_model import RewardTrainingConfig

    return {
        "parallel": ParallelConfig, "tokenization": RewardTokenization,
        "training": RewardTrainingConfig, "optimizer": OptimizerSettings,
        "precision": PrecisionConfig, "resources": ResourcesConfig, "fit_check": FitCheckConfig,
    }


def _relative_to(config_path: Path, value: str) -> str:
    """A path from the config; relative ones are relative to the config file's directory."""
    return str(Path(value) if Path(value).is_absolute() else config_path.parent / value)


def load_train_rm_config(path: str | Path) -> TrainRMConfig:
    """Parse and type the YAML recipe strictly (``config.typed_load``); errors name the file and key."""
    import yaml

    from megatron_rlhf.config.errors import ConfigError, MissingInput
    from megatron_rlhf.config.recipe import load_recipe
    from megatron_rlhf.config.typed_load import at, convert, dataclass_from_mapping

    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"config file not found: {path}")
    try:
        raw = load_recipe(path)  # a recipe's `base:` files merged in, key by key
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    values = dict(raw)
    for name, cls in _section_classes().items():
        if values.get(name) is not None:
            values[name] = dataclass_from_mapping(cls, values[name], at(str(path), name))
    for key in ("model", "output"):
        if key in values:
            values[key] = _relative_to(path, convert(str, values[key], at(str(path), key)))
    fit = values.get("fit_check")
    if fit is not None and fit.hf_config is not None:  # like every train-rm path: relative to the file
        values["fit_check"] = dataclasses.replace(fit, hf_config=_relative_to(path, fit.hf_config))
    for key in ("train_files", "validation_files"):
        if key in values:
            files = convert(tuple[str, ...], values[key], at(str(path), key))
            values[key] = tuple(_relative_to(path, item) for item in files)
    return dataclass_from_mapping(TrainRMConfig, values, str(path))


@dataclass(frozen=True)
class TrainRMPlan:
    """Validated, tokenised and picklable: everything a rank needs."""

    config: TrainRMConfig
    world_size: int
    padded_vocab: int
    hf_config: dict
    params_dtype: str
    pad_token_id: int
    train: Any
    """TokenizedRewardData."""
    validation: Any = None
    """TokenizedRewardData or None."""
    notes: list[str] = field(default_factory=list)


def _read_data(config: TrainRMConfig, files: tuple[str, ...], tokenizer) -> tuple[Any, list[str]]:
    from megatron_rlhf.data.reward_data import read_reward_file, tokenize_records

    records, notes = [], []
    for path in files:
        dataset = read_reward_file(path, config.tokenization.step_separator, strict=not config.skip_malformed_lines)
        if dataset.malformed:
            notes.append(f"skipped {len(dataset.malformed)} malformed line(s):\n{dataset.report()}")
        records += dataset.records
    data = tokenize_records(tokenizer, records, config.tokenization)
    if data.dropped_too_long:
        notes.append(f"left out {data.dropped_too_long} record(s) longer than max_length={config.tokenization.max_length}")
    return data, notes


def plan_train_rm(config: TrainRMConfig, world_size: int, prepare_output: bool = True) -> TrainRMPlan:
    import transformers

    from megatron_rlhf.checkpoint.convert import hf_weights_dtype_name
    from megatron_rlhf.checkpoint.dist_ckpt import prepare_output_dir
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.models.arch import arch_spec_from_hf_config, load_hf_config
    from megatron_rlhf.models.provider import ModelBuildConfig, validate_layout

    hf_config = load_hf_config(config.model)
    arch = arch_spec_from_hf_config(hf_config, source=str(Path(config.model) / "config.json"))
    data_parallel = config.parallel.data_parallel(world_size)
    if config.training.microbatches_per_step % data_parallel:
        raise UserError(
            f"training.microbatches_per_step={config.training.microbatches_per_step} is not a "
            f"multiple of the data-parallel size {data_parallel}"
        )
    padded_vocab = validate_layout(arch, config.parallel, ModelBuildConfig(role=config.role, transformer_impl="local"))
    params_dtype = hf_weights_dtype_name(HFWeightReader(config.model), hf_config)
    config.resources.check_fits(world_size, f"train-rm with {world_size} processes")
    if config.precision.mode != "fp32":
        from megatron_rlhf.config.precision import validate_precision_environment

        validate_precision_environment(config.precision)
        params_dtype = config.precision.params_dtype
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model)
    train, notes = _read_data(config, config.train_files, tokenizer)
    if config.training.pairs_per_microbatch and not train.pairs:
        raise UserError(f"training.pairs_per_microbatch > 0 but {config.train_files} hold no preference pairs")
    if config.training.responses_per_microbatch and not train.labelled:
        raise UserError(f"training.responses_per_microbatch > 0 but {config.train_files} hold no labelled responses")
    validation = None
    if config.validation_files:
        validation, more = _read_data(config, config.validation_files, tokenizer)
        notes += more
    if prepare_output:
        prepare_output_dir(config.output, overwrite=False, inputs=(config.model,), name="output",
                           remedy="choose another output directory, or remove this one")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TrainRMPlan(config, world_size, padded_vocab, hf_config, params_dtype, pad, train, validation, notes)


def _validation_batches(plan: TrainRMPlan):
    from megatron_rlhf.data.reward_data import collate_labelled, collate_pairs

    data = plan.validation
    if data is None:
        return None, None
    pairs = collate_pairs(data.pairs, plan.pad_token_id) if data.pairs else None
    labelled = collate_labelled(data.labelled, plan.pad_token_id) if data.labelled else None
    return pairs, labelled


def _train_rm_worker(plan: TrainRMPlan) -> dict[str, Any]:
    import torch

    from megatron_rlhf.checkpoint.dist_ckpt import CheckpointMetadata
    from megatron_rlhf.checkpoint.role_model import HFWeights, load_role_model
    from megatron_rlhf.data.reward_data import (
        MixedBatchSampler,
        collate_labelled,
        collate_pairs,
    )
    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.models.provider import ModelBuildConfig
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.rewards.learned import write_reward_model_info
    from megatron_rlhf.trainer.reward_model import RewardModelTrainer

    config = plan.config
    state = initialize_parallel(config.parallel, seed=config.seed)
    if state.rank == 0 and not logging.getLogger().handlers:  # a spawned rank: report progress
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    arch = arch_spec_from_hf_config(plan.hf_config)
    impl = "transformer_engine" if config.precision.uses_transformer_engine else "local"
    build = ModelBuildConfig(role=config.role, transformer_impl=impl, params_dtype=plan.params_dtype,
                             precision=config.precision if config.precision.mode != "fp32" else None)
    model = load_role_model(arch, config.parallel, build, HFWeights(config.model), state.device).model
    trainer = RewardModelTrainer(model, config.optimizer, config.training)
    training = config.training
    sampler = MixedBatchSampler(
        len(plan.train.pairs), len(plan.train.labelled), training.pairs_per_step, training.responses_per_step, config.seed
    )
    validation = _validation_batches(plan)
    output = Path(config.output)
    metrics_file = None
    if state.rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        metrics_file = (output / "metrics.jsonl").open("w")
    last_metrics: dict[str, Any] = {}
    for step in range(config.steps):
        pair_rows, labelled_rows = sampler.step(step)
        pairs = collate_pairs([plan.train.pairs[i] for i in pair_rows], plan.pad_token_id) if pair_rows else None
        labelled = (
            collate_labelled([plan.train.labelled[i] for i in labelled_rows], plan.pad_token_id)
            if labelled_rows else None
        )
        row = {"step": step + 1, **dataclasses.asdict(trainer.train_step(pairs, labelled))}
        final = step + 1 == config.steps
        if any(part is not None for part in validation) and (final or (config.validate_every and (step + 1) % config.validate_every == 0)):
            last_metrics = dataclasses.asdict(trainer.evaluate(*validation))
            row.update({f"validation/{name}": value for name, value in last_metrics.items()})
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            log.info("step %d loss %.4f %s", step + 1, row["loss"],
                     " ".join(f"{k}={v}" for k, v in row.items() if k.startswith("validation/")))
    if metrics_file is not None:
        metrics_file.close()
    metadata = CheckpointMetadata(
        role=config.role, hf_config=plan.hf_config,
        tensor_parallel=config.parallel.tensor_parallel, pipeline_parallel=config.parallel.pipeline_parallel,
        expert_parallel=config.parallel.expert_parallel, padded_vocab_size=plan.padded_vocab,
        params_dtype=plan.params_dtype, transformer_impl=model.transformer_impl,
    )
    checkpoint = output / "checkpoint"
    trainer.save_checkpoint(checkpoint, metadata, hf_side_dir=config.model)
    if state.rank == 0:
        write_reward_model_info(checkpoint, config.role, config.tokenization)
    torch.distributed.barrier()
    return {**last_metrics, "skipped_steps": trainer.skipped_steps}


def train_reward_model(config: TrainRMConfig, world_size: int | None = None) -> dict[str, Any]:
    """Train as ``config`` says; return the final validation metrics (``pairwise_accuracy``,
    ``auc``, ``step_auc``), ``skipped_steps`` and ``checkpoint`` (the directory written).

    Under torchrun every rank calls this with the same config (WORLD_SIZE rules); otherwise it
    starts ``world_size`` local processes (default TP * PP * ``config.data_parallel``).
    """
    from megatron_rlhf.parallel.launch import already_launched, run_distributed

    if already_launched():
        world_size, is_first = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]) == 0
    else:
        world_size, is_first = world_size or config.parallel.world_size(config.data_parallel), True
    if world_size < 1:
        raise UserError(f"world size must be >= 1, got {world_size}")
    from megatron_rlhf.planning.fit_check import check_rm_config_fits

    check_rm_config_fits(config, world_size)  # layout and GPU memory, before any process starts
    plan = plan_train_rm(config, world_size, prepare_output=is_first)
    for note in plan.notes:
        log.warning("%s", note)
    metrics = run_distributed(_train_rm_worker, world_size, plan)[0]
    return {**metrics, "checkpoint": str(Path(config.output) / "checkpoint")}
