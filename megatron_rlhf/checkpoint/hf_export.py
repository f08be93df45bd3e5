"""Write a live (in-memory) Megatron model as a Hugging Face directory, from any TP/PP layout.

Used by the trainers (SFT, reward model, RL policy) to hand a model to vLLM, transformers or the
next stage of a pipeline. Every rank of the model's world calls :func:`save_hf_directory`;
global rank 0 writes. The directory is written next to its final path and renamed when complete,
so it holds a whole model or stays as it was. The weights are gathered by the same mapping the
checkpoint converters and the weight sync use (:func:`megatron_rlhf.mapping.engine.export_hf_weights`).
Tokenizer and config side files are copied from ``source_hf_dir``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_rlhf.checkpoint.hf_io import HFWeightWriter, copy_side_files


def save_hf_directory(model: torch.nn.Module, arch: Any, source_hf_dir: str | Path, out_dir: str | Path,
                      role: str = "lm", dtype: torch.dtype | None = None) -> str:
    """Write ``model`` (this rank's shard; a collective) to ``out_dir``; returns its path.

    ``dtype``: the tensors' dtype in the files (default: the model's parameter dtype; Megatron
    keeps norms in float32 whatever the model dtype, and they are cast too).
    """
    from megatron_rlhf.mapping.engine import export_hf_weights

    out_dir = Path(out_dir)
    is_writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if dtype is None:
        dtype = next(model.parameters()).dtype
    partial = out_dir.with_name(out_dir.name + ".partial")
    if is_writer and partial.exists():
        shutil.rmtree(partial)
    writer = HFWeightWriter(partial) if is_writer else None
    for name, tensor in export_hf_weights(model, arch, role):
        if writer is not None:
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    if writer is not None:
        writer.close()
        copy_side_files(source_hf_dir, partial)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return str(out_dir)
