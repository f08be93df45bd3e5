"""Megatron distributed checkpoints of a model, with the metadata needed to rebuild it anywhere.

Layout of a checkpoint directory::

    <dir>/megatron_rlhf.json   what model this is: role, HF config, saved layout, padded vocab
    <dir>/hf/                  config.json + tokenizer files (they travel with the checkpoint)
    <dir>/model/               Megatron-Core distributed checkpoint (torch_dist format)

Because the model part is a Megatron-Core distributed checkpoint, a checkpoint saved at one
TP/PP/EP layout loads at any other layout whose TP size divides the saved padded vocabulary.

Atomicity: :func:`save_model_checkpoint` writes into ``<dir>.partial`` and renames it to
``<dir>`` only after every rank has finished, so ``<dir>`` either holds a complete checkpoint or
does not exist. :func:`read_checkpoint_metadata` refuses directories without the metadata file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_rlhf.config.errors import MissingInput, OutputInTheWay, UserError
from megatron_rlhf.config.parallel import ParallelConfig

METADATA_FILE = "megatron_rlhf.json"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint directory that is missing, incomplete or from an unknown format."""


def save_sharded(sharded_state_dict: dict, directory: str) -> None:
    """``dist_checkpointing.save`` (torch_dist), synchronous, without a multiprocessing Manager.

    Megatron-Core's torch_dist writer hands each save's write results to the saving process
    through ``filesystem_async._results_queue``, a ``multiprocessing`` Manager queue it starts
    (a spawned server process) at the process's first save: measured 1.56 s for the first save
    of the tiny llama against 0.05 s for the next ones, and a server process whose socket
    directory (``/tmp/pymp-*``) was left behind whenever the saving process was killed (Ray ends
    its workers that way). The Manager is there for asynchronous saves, where a forked process
    runs the writer; every save here is synchronous (the writer runs in this process and forks
    only its file writers, which report through their own queue), so an in-process
    ``queue.Queue`` carries the same results. Set once per process, and only where Megatron has
    that global (other releases: their own default)."""
    import queue

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded_state_dict, directory)


@dataclass(frozen=True)
class CheckpointMetadata:
    role: str
    hf_config: dict[str, Any]
    tensor_parallel: int
    pipeline_parallel: int
    expert_parallel: int
    padded_vocab_size: int
    params_dtype: str
    transformer_impl: str
    format_version: int = FORMAT_VERSION

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_parallel=self.tensor_parallel,
            pipeline_parallel=self.pipeline_parallel,
            expert_parallel=self.expert_parallel,
        )


def read_checkpoint_metadata(ckpt_dir: str | Path) -> CheckpointMetadata:
    directory = Path(ckpt_dir)
    if not directory.is_dir():
        partial = directory.with_name(directory.name + ".partial")
        hint = f" (an incomplete save was left at {partial})" if partial.exists() else ""
        raise MissingInput(f"{directory}: checkpoint directory not found{hint}")
    path = directory / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: not a megatron-rlhf checkpoint (no {METADATA_FILE}); make one with "
            "checkpoints_tools/hf_to_megatron.py"
        )
    try:
        raw = json.loads(path.read_text())
        metadata = CheckpointMetadata(**raw)
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({error})") from error
    if metadata.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version={metadata.format_version}, this version reads {FORMAT_VERSION}"
        )
    if not (directory / "model").is_dir():
        raise CheckpointError(f"{directory}: the model/ part of the checkpoint is missing")
    return metadata


def check_shard_files(ckpt_dir: str | Path) -> None:
    """UserError naming the file if a shard (``model/*.distcp``) is missing or shorter than the
    checkpoint's ``.metadata`` says (a truncated or partial copy); reads the metadata only."""
    import pickle

    metadata_path = Path(ckpt_dir) / "model" / ".metadata"
    if not metadata_path.is_file():
        raise CheckpointError(f"{metadata_path}: missing (the model/ part of the checkpoint is incomplete)")
    try:
        with metadata_path.open("rb") as handle:
            metadata = pickle.load(handle)  # noqa: S301 - written by torch.distributed.checkpoint
    except Exception as error:  # noqa: BLE001 - any failure to read it is a corrupt file
        raise CheckpointError(f"{metadata_path}: unreadable ({type(error).__name__}: {error})") from None
    needed: dict[str, int] = {}
    for item in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(item, "relative_path", None)
        if name is not None:
            needed[name] = max(needed.get(name, 0), int(item.offset) + int(item.length))
    for name, size in sorted(needed.items()):
        shard = metadata_path.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{shard}: checkpoint shard missing (named by {metadata_path})")
        if shard.stat().st_size < size:
            raise CheckpointError(f"{shard}: checkpoint shard is truncated ({shard.stat().st_size} bytes, "
                                  f"{metadata_path} needs {size}); copy the checkpoint again")


def prepare_output_dir(
    out_dir: str | Path, overwrite: bool, inputs: tuple[str | Path, ...] = (), name: str = "--out",
    remedy: str = "pass --overwrite",
) -> Path:
    """Check ``out_dir`` can be written; remove a stale ``.partial`` sibling. Call on one rank.

    ``inputs``: directories the job reads; an output that is one of them (or holds one) is
    refused, since writing it replaces the whole directory. ``name`` is how the user gave the
    output (an option or a config key) and ``remedy`` what they can do about a non-empty one.
    """
    directory = Path(out_dir)
    for source in inputs:
        source_path = Path(source).resolve()
        if directory.resolve() == source_path or directory.resolve() in source_path.parents:
            raise OutputInTheWay(
                f"{name} {directory} would replace the input {source}; choose another directory"
            )
    if directory.exists() and not directory.is_dir():
        raise OutputInTheWay(f"{name} {directory}: exists and is not a directory")
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise OutputInTheWay(f"{name} {directory}: already exists and is not empty ({remedy})")
    partial = directory.with_name(directory.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    return directory


def save_model_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    metadata: CheckpointMetadata,
    hf_side_dir: str | Path | None,
) -> None:
    """Save ``model`` (this rank's stage) collectively; all ranks must call it."""
    from megatron_rlhf.checkpoint.hf_io import copy_side_files

    directory = Path(out_dir)
    partial = directory.with_name(directory.name + ".partial")
    rank = torch.distributed.get_rank()
    if rank == 0:
        (partial / "model").mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    save_sharded(model.sharded_state_dict(), str(partial / "model"))
    torch.distributed.barrier()
    if rank == 0:
        if hf_side_dir is not None:
            copy_side_files(hf_side_dir, partial / "hf", include_config=False)
        (partial / "hf").mkdir(exist_ok=True)
        (partial / "hf" / "config.json").write_text(json.dumps(metadata.hf_config, indent=2))
        (partial / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        partial.rename(directory)
    torch.distributed.barrier()


def load_model_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Load this rank's shards of ``model`` from a checkpoint saved at any layout."""
    from megatron.core import dist_checkpointing

    directory = Path(ckpt_dir) / "model"
    sharded = model.sharded_state_dict()
    try:
        loaded = dist_checkpointing.load(sharded, str(directory))
    except Exception as error:  # Megatron raises several types for unreadable checkpoints
        raise CheckpointError(f"{directory}: cannot load distributed checkpoint ({error})") from error
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: checkpoint does not match the model (missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]})"
        )
