"""A ``gloo`` backend for vLLM's weight-transfer API: trainer -> vLLM workers on CPU machines.

vLLM ships NCCL and CUDA-IPC weight-transfer backends; neither runs without GPUs. This module adds
the same protocol over a private gloo process group, registered with vLLM's own
``WeightTransferEngineFactory`` (see :mod:`megatron_rlhf.rollout.vllm_plugin`), so a CPU engine is
updated through vLLM's supported worker methods (``init_weight_transfer_engine``,
``start_weight_update``, ``update_weights``, ``finish_weight_update``) rather than by reaching
into the model runner.

Wire format: the trainer's sender rank (rank 0 of the transfer group) packs a bucket of HF-named
tensors into one flat byte buffer and broadcasts it; each update call names the tensors of one
bucket (``names``, ``dtype_names``, ``shapes``) so workers unpack views of the buffer and hand
them to ``model.load_weights`` (vLLM re-shards them to its own TP layout). Peak extra memory on a
worker is one bucket.

The transfer group is a fresh ``ProcessGroupGloo`` over its own ``TCPStore``: it never touches
the trainer's or vLLM's default process groups.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch

BACKEND_NAME = "gloo"


def make_transfer_group(host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0):
    """A private gloo group: rank 0 hosts the store (the trainer's sender), workers join."""
    store = torch.distributed.TCPStore(
        host,
        port,
        world_size,
        is_master=rank == 0,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    return torch.distributed.ProcessGroupGloo(store, rank, world_size, datetime.timedelta(seconds=timeout_s))


def broadcast_buffer(group: Any, buffer: torch.Tensor) -> None:
    """Broadcast ``buffer`` in place from rank 0 of ``group``."""
    options = torch.distributed.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([buffer], options).wait()


def unpack_bucket(buffer: torch.Tensor, names: list[str], dtype_names: list[str],
                  shapes: list[list[int]]) -> list[tuple[str, torch.Tensor]]:
    """Views of ``buffer`` (uint8) as the named tensors, in order."""
    tensors, offset = [], 0
    for name, dtype_name, shape in zip(names, dtype_names, shapes):
        dtype = getattr(torch, dtype_name)
        count = 1
        for dim in shape:
            count *= int(dim)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        tensors.append((name, buffer[offset : offset + nbytes].view(dtype).view(shape)))
        offset += nbytes
    if offset != buffer.numel():
        raise ValueError(f"bucket holds {buffer.numel()} bytes but its tensors need {offset}")
    return tensors


def pack_bucket(tensors: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, Any]]:
    """One uint8 buffer holding the tensors back to back, and the update info naming them."""
    flat = [t.detach().contiguous().view(-1).view(torch.uint8) for _, t in tensors]
    buffer = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
    info = {
        "names": [name for name, _ in tensors],
        "dtype_names": [str(t.dtype).split(".")[-1] for _, t in tensors],
        "shapes": [list(t.shape) for _, t in tensors],
        "num_bytes": int(buffer.numel()),
    }
    return buffer, info


def build_engine_classes():
    """Define the worker-side engine against the installed vLLM (imported lazily)."""
    from vllm.distributed.weight_transfer.base import WeightTransferInitInfo, WeightTransferUpdateInfo

    from megatron_rlhf.rollout.layerwise_reload import reload_engine_base

    @dataclass
    class GlooWeightTransferInitInfo(WeightTransferInitInfo):
        master_address: str
        master_port: int
        rank_offset: int
        world_size: int

    @dataclass
    class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]
        num_bytes: int

    class GlooWeightTransferEngine(reload_engine_base()):
        """Worker side: receive broadcast buckets, load them with ``model.load_weights``."""

        init_info_cls = GlooWeightTransferInitInfo
        update_info_cls = GlooWeightTransferUpdateInfo

        def __init__(self, config, vllm_config, device, model) -> None:
            super().__init__(config, vllm_config, device, model)
            self.group = None

        def init_transfer_engine(self, init_info) -> None:
            from vllm.distributed.parallel_state import get_world_group

            rank = init_info.rank_offset + get_world_group().rank
            self.group = make_transfer_group(
                init_info.master_address, init_info.master_port, rank, init_info.world_size
            )

        def receive_weights(self, update_info) -> None:
            if self.group is None:
                raise RuntimeError("gloo weight transfer used before init_weight_transfer_engine")
            buffer = torch.empty(update_info.num_bytes, dtype=torch.uint8)
            broadcast_buffer(self.group, buffer)
            tensors = unpack_bucket(
                buffer, update_info.names, update_info.dtype_names, update_info.shapes
            )
            self.model.load_weights([(name, t.to(self.device)) for name, t in tensors])

        def shutdown(self) -> None:
            self.group = None

    return GlooWeightTransferEngine
