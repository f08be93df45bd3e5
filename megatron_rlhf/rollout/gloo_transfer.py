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

The trainer side (:func:`build_trainer_classes`) implements vLLM's ``TrainerWeightTransferEngine``
interface, so :class:`~megatron_rlhf.rollout.weight_sync.WeightSync` drives it exactly as it
drives vLLM's own ``nccl`` and ``ipc`` trainer engines.

The transfer group is a fresh ``ProcessGroupGloo`` over its own ``TCPStore``: it never touches
the trainer's or vLLM's default process groups.
"""

from __future__ import annotations

import datetime
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

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


@functools.cache
def build_trainer_classes():
    """Define the trainer-side engine (vLLM's ``TrainerWeightTransferEngine``) lazily."""
    from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

    from megatron_rlhf.rollout.weight_source import TransferStats, iter_buckets

    @dataclass
    class GlooTrainerInitInfo(TrainerInitInfo):
        backend: ClassVar[str] = BACKEND_NAME
        master_address: str = "127.0.0.1"
        master_port: int = 0
        world_size: int = 2
        """The sender plus every vLLM worker."""
        bucket_bytes: int = 64 * 1024**2

    class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine):
        """Sender (trainer rank 0): broadcast packed buckets while the workers receive them.

        Other trainer ranks only iterate the source, which keeps them in the export's
        collectives (TP gathers, PP/EP broadcasts).
        """

        init_info_cls = GlooTrainerInitInfo

        def __init__(self, *, client, source, is_sender: bool = True, bucket_bytes: int = 64 * 1024**2):
            super().__init__(client=client, source=source, is_sender=is_sender)
            self.bucket_bytes = bucket_bytes
            self.group = None

        @classmethod
        def trainer_init(cls, init_info, *, client, source=None):
            if source is None:
                raise ValueError("the gloo trainer engine needs a WeightSource")
            engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                         bucket_bytes=init_info.bucket_bytes)
            if engine.is_sender:
                worker_info = {"master_address": init_info.master_address,
                               "master_port": init_info.master_port,
                               "rank_offset": 1, "world_size": init_info.world_size}
                # The workers block in the rendezvous: start them, then join as rank 0.
                with ThreadPoolExecutor(max_workers=1) as pool:
                    future = pool.submit(client.init_weight_transfer_engine, worker_info)
                    engine.group = make_transfer_group(init_info.master_address, init_info.master_port,
                                                       0, init_info.world_size)
                    future.result()
            return engine

        def send_weights(self) -> TransferStats:
            if not self.is_sender:
                return TransferStats.iterated(self.source)
            if self.group is None:
                raise RuntimeError("gloo weight transfer used after shutdown; call trainer_init again")
            stats = TransferStats()
            self.client.start_weight_update()
            pool = ThreadPoolExecutor(max_workers=1)
            try:
                for bucket in iter_buckets(self.source, self.bucket_bytes):
                    buffer, info = pack_bucket(bucket)
                    future = pool.submit(self.client.update_weights, info)
                    if future.done():
                        future.result()  # a rejected request surfaces instead of a hang in broadcast
                    broadcast_buffer(self.group, buffer)
                    future.result()
                    stats.add_bucket(bucket)
            finally:
                pool.shutdown(wait=False)  # never join a worker stuck in a broken broadcast
            self.client.finish_weight_update()
            return stats

        def shutdown(self) -> None:
            self.group = None

    return GlooTrainerInitInfo, GlooTrainerWeightTransferEngine
