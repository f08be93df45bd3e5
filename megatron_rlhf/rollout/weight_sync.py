"""Live weight sync: a Megatron actor (any TP/PP/EP) -> a running vLLM engine (its own TP).

Every trainer rank calls :meth:`WeightSync.sync`; together they stream the full weights in HF
naming through :func:`megatron_rlhf.mapping.engine.export_hf_weights` (the mapping the checkpoint
converters use). The global rank 0 holds the :class:`~megatron_rlhf.rollout.engine.RolloutEngine`,
packs the tensors into buckets of ``bucket_bytes`` and pushes each bucket into vLLM through
vLLM's weight-transfer API (``start_weight_update`` / ``update_weights`` per bucket /
``finish_weight_update``); vLLM's ``load_weights`` reshards to the engine's TP layout.

Guarantees: never goes through a file; peak extra memory on the sender is about one bucket plus
the parameter being gathered; every rank returns the same :class:`SyncReport`.

Transports (both registered through :mod:`megatron_rlhf.rollout.vllm_plugin`, chosen by the
engine's ``weight_transfer_backend``):

- ``shm`` (:mod:`~megatron_rlhf.rollout.shm_transfer`): the sender writes each bucket into one
  shared-memory segment created by :meth:`WeightSync.connect`; same host only. Buckets are cut
  before they would exceed ``bucket_bytes``, so the segment stays ``bucket_bytes`` large unless
  one tensor is larger. The segment is unlinked by :meth:`WeightSync.shutdown`, when a sync
  raises (the sync must then be re-connected), and at process exit.
- ``gloo`` (:mod:`~megatron_rlhf.rollout.gloo_transfer`): a broadcast over a private gloo group;
  works across hosts (disaggregated placement).

vLLM's ``nccl`` (disaggregated GPUs) and ``ipc`` (colocated, CUDA IPC handles) backends need
their own trainer-side engines and are not driven by this class yet: asking for them raises.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rlhf.rollout import gloo_transfer, shm_transfer
from megatron_rlhf.rollout.gloo_transfer import broadcast_buffer, make_transfer_group, pack_bucket

log = logging.getLogger(__name__)
TRANSPORTS = (gloo_transfer.BACKEND_NAME, shm_transfer.BACKEND_NAME)


class UnsupportedTransport(RuntimeError):
    """The engine's weight-transfer backend has no trainer side here yet."""


@dataclass(frozen=True)
class WeightSyncConfig:
    bucket_bytes: int = 64 * 1024**2
    """Bytes per transfer bucket: bounds the sender's and workers' extra memory (and, for
    ``shm``, the shared-memory segment, which must fit in ``/dev/shm``)."""
    host: str = "127.0.0.1"
    """Address the sender's rendezvous store listens on (reachable by the vLLM workers)."""

    def __post_init__(self) -> None:
        if self.bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={self.bucket_bytes} must be >= 1")


@dataclass(frozen=True)
class SyncReport:
    seconds: float
    bytes: int
    tensors: int
    buckets: int
    largest_bucket_bytes: int


class WeightSync:
    """Pushes the actor's weights into vLLM; construct on every trainer rank."""

    def __init__(self, engine: Any | None, config: WeightSyncConfig = WeightSyncConfig()):
        self.is_sender = torch.distributed.get_rank() == 0
        if self.is_sender and engine is None:
            raise ValueError("global rank 0 must hold the rollout engine")
        self.engine = engine if self.is_sender else None
        self.config = config
        self.group = None
        self.segment: shm_transfer.SharedSegment | None = None
        self.backend = engine.backend if self.is_sender else None
        if self.is_sender and self.backend not in TRANSPORTS:
            raise UnsupportedTransport(
                f"weight sync over vLLM's {engine.backend!r} backend is not driven by "
                "megatron_rlhf yet; use weight_transfer_backend='shm' (same host) or 'gloo'"
            )

    @property
    def connected(self) -> bool:
        return self.group is not None or self.segment is not None

    def connect(self) -> None:
        """Open the trainer -> engine transfer group (once, before the first sync)."""
        if not self.is_sender:
            return
        if self.backend == shm_transfer.BACKEND_NAME:
            self.segment = shm_transfer.SharedSegment(self.config.bucket_bytes)
            try:
                self.engine.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {
                    "segment_name": self.segment.name, "segment_bytes": self.segment.num_bytes}})
            except BaseException:
                self.shutdown()
                raise
            return
        from megatron_rlhf.parallel.launch import free_port

        port = free_port()
        workers = self.engine.config.tensor_parallel
        init_info = {"master_address": self.config.host, "master_port": port,
                     "rank_offset": 1, "world_size": 1 + workers}
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self.engine.llm.collective_rpc, "init_weight_transfer_engine",
                                 kwargs={"init_info": init_info})
            self.group = make_transfer_group(self.config.host, port, 0, 1 + workers)
            future.result()

    def shutdown(self) -> None:
        """Unlink the ``shm`` segment (and let the workers unmap it). Idempotent; every rank may call."""
        segment, self.segment, self.group = self.segment, None, None
        if segment is None:
            return
        segment.unlink()
        if getattr(self.engine, "llm", None) is not None:  # an engine already shut down needs nothing
            try:
                self.engine.llm.collective_rpc("shutdown_weight_transfer_engine")
            except Exception as error:  # the segment is gone either way; workers unmap at exit
                log.warning("vLLM workers did not release the weight-transfer segment: %s", error)

    def _send_shm_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        info = shm_transfer.bucket_layout(bucket)
        self.segment.ensure(info["num_bytes"])
        shm_transfer.pack_bucket_into(bucket, self.segment.view)
        info.update(segment_name=self.segment.name, segment_bytes=self.segment.num_bytes)
        # Returns once every worker has copied the bucket out: the segment is free again.
        self.engine.llm.collective_rpc("update_weights", kwargs={"update_info": info})
        return sum(t.numel() * t.element_size() for _, t in bucket)  # payload, alignment padding not counted

    def _send_bucket(self, pool: ThreadPoolExecutor, bucket: list[tuple[str, torch.Tensor]]) -> int:
        if self.segment is not None:
            return self._send_shm_bucket(bucket)
        buffer, info = pack_bucket(bucket)
        future = pool.submit(self.engine.llm.collective_rpc, "update_weights",
                             kwargs={"update_info": info})
        if future.done():
            future.result()  # a rejected request surfaces instead of a hang in broadcast
        broadcast_buffer(self.group, buffer)
        future.result()
        return int(buffer.numel())

    @torch.no_grad()
    def sync(self, model: torch.nn.Module, arch: Any, role: str = "lm") -> SyncReport:
        """Stream ``model``'s weights into the engine; a collective over all trainer ranks."""
        from megatron_rlhf.mapping.engine import export_hf_weights

        if self.is_sender and not self.connected:
            raise RuntimeError("WeightSync.sync called before connect() (or after a failed sync or shutdown)")
        start = time.perf_counter()
        total = tensors = buckets = largest = 0
        dtype = getattr(torch, self.engine.config.dtype) if self.is_sender else None
        pool = ThreadPoolExecutor(max_workers=1) if self.is_sender and self.segment is None else None
        cut_before = self.segment is not None  # shm: keep buckets within the segment
        try:
            if self.is_sender:
                self.engine.llm.collective_rpc("start_weight_update")
            bucket: list[tuple[str, torch.Tensor]] = []
            bucket_bytes = 0
            for name, tensor in export_hf_weights(model, arch, role):
                tensors += 1
                if not self.is_sender:
                    continue
                tensor = tensor.to(device="cpu", dtype=dtype)
                size = shm_transfer.aligned_nbytes(tensor) if cut_before else tensor.numel() * tensor.element_size()
                if cut_before and bucket and bucket_bytes + size > self.config.bucket_bytes:
                    sent = self._send_bucket(pool, bucket)
                    total, buckets, largest = total + sent, buckets + 1, max(largest, sent)
                    bucket, bucket_bytes = [], 0
                bucket.append((name, tensor))
                bucket_bytes += size
                if bucket_bytes >= self.config.bucket_bytes:
                    sent = self._send_bucket(pool, bucket)
                    total, buckets, largest = total + sent, buckets + 1, max(largest, sent)
                    bucket, bucket_bytes = [], 0
            if self.is_sender:
                if bucket:
                    sent = self._send_bucket(pool, bucket)
                    total, buckets, largest = total + sent, buckets + 1, max(largest, sent)
                self.engine.llm.collective_rpc("finish_weight_update")
        except BaseException:
            if self.segment is not None:  # never leave a segment behind a failed sync; the
                self.segment.unlink()     # workers' update is still open, so they keep their
                self.segment = None       # mapping until the next connect or their exit
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=False)
        numbers = [time.perf_counter() - start, total, tensors, buckets, largest]
        torch.distributed.broadcast_object_list(numbers, src=0)
        return SyncReport(float(numbers[0]), int(numbers[1]), int(numbers[2]), int(numbers[3]), int(numbers[4]))
