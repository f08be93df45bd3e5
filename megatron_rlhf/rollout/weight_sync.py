"""Live weight sync: a Megatron actor (any TP/PP/EP) -> a running vLLM engine (its own TP).

Built on vLLM's trainer-side weight-transfer API: every trainer rank constructs a
:class:`WeightSync`, :meth:`WeightSync.connect` runs ``trainer_init`` of the transport's trainer
engine on every rank (a collective), and :meth:`WeightSync.sync` runs its ``send_weights``. The
weights come from a :func:`~megatron_rlhf.rollout.weight_source.megatron_weight_source`: the
full model in HF naming through ``mapping/`` (the converters' mapping), in lockstep on every
rank; the global rank 0 holds the engine and is the sender; vLLM's ``load_weights`` reshards to
the engine's own TP layout.

Transports, by the engine's ``weight_transfer_backend``:

- ``shm`` (:mod:`~megatron_rlhf.rollout.shm_transfer`, this package): one shared-memory segment
  on the sender's host, one bucket at a time; CPU, same host (the CPU default).
- ``gloo`` (:mod:`~megatron_rlhf.rollout.gloo_transfer`, this package): a broadcast over a
  private gloo group; any hosts; GPU engines move each bucket to their device.
- ``nccl`` (vLLM's ``NCCLTrainerWeightTransferEngine``): packed NCCL broadcast from the sender's
  GPU to the workers' (disaggregated GPUs).
- ``ipc`` (vLLM's ``IPCTrainerWeightTransferEngine``): CUDA IPC handles to packed buckets on each
  trainer rank's GPU, opened by the vLLM worker on the same GPU (colocated GPUs).

Guarantees: never through a file; extra memory on the sender bounded by the buckets in flight
(``bucket_bytes`` each: ``shm`` keeps two segments so packing overlaps loading, ``gloo`` one
buffer; vLLM's packed ``nccl``/``ipc`` use it as their packed buffer size) plus one layer's
tensors (buckets are cut between layers where a layer fits); every rank returns the same :class:`SyncReport`
(but ``pending``, rank 0's only).

A sync may leave the engine loading (``sync(wait=False)``; ``shm`` to an engine in another
process only: :attr:`WeightSync.can_defer`): it returns once every weight is packed into the
segments, so the model may train on while the engine loads; whoever generates next waits for
``SyncReport.pending`` first, and the next sync waits for them too (a failed load is then
handled as a failed sync, below).

A sync that fails half-way is aborted cleanly and reported: the sender closes the transport
(``shm``: segments unlinked), asks every vLLM worker to close its update (layers left open get
their previous weights back: :mod:`~megatron_rlhf.rollout.layerwise_reload`), and raises
:class:`WeightSyncAborted` naming the cause; the engine keeps serving (with a mix of old and new
weights until the next successful sync) and the next :meth:`WeightSync.sync` reconnects and
syncs normally. An ``Exception`` is reported that way; a ``BaseException`` (interrupt) is
re-raised as is after the abort.
Verified here on CPU for ``shm`` and ``gloo``; the ``nccl`` and ``ipc`` paths need GPUs and are
covered only by the ``gpu``-marked tests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rlhf.rollout import gloo_transfer, shm_transfer

log = logging.getLogger(__name__)
GPU_TRANSPORTS = ("nccl", "ipc")
TRANSPORTS = (gloo_transfer.BACKEND_NAME, shm_transfer.BACKEND_NAME) + GPU_TRANSPORTS


class UnsupportedTransport(RuntimeError):
    """The engine's weight-transfer backend has no trainer side here."""


class WeightSyncAborted(RuntimeError):
    """A sync failed half-way and was aborted: the engine serves on, its weights a mix of the
    previous and the new ones until the next successful sync (``__cause__``: the failure)."""


@dataclass(frozen=True)
class WeightSyncConfig:
    bucket_bytes: int = 64 * 1024**2
    """Bytes per transfer bucket: bounds the sender's and workers' extra memory (for ``shm``,
    each of its two shared-memory segments, which must fit in ``/dev/shm`` together)."""
    host: str = "127.0.0.1"
    """Address the sender's rendezvous store listens on (``gloo``, ``nccl``; reachable by the
    vLLM workers)."""

    def __post_init__(self) -> None:
        if self.bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={self.bucket_bytes} must be >= 1")


@dataclass(frozen=True)
class SyncReport:
    seconds: float
    bytes: int
    tensors: int
    buckets: int
    """Buckets sent (0 where vLLM's own engine does the bucketing: ``nccl``, ``ipc``)."""
    largest_bucket_bytes: int
    pending: tuple = ()
    """Rank 0 of a deferred ``sync(wait=False)``: the Ray handles of every engine call of the
    sync (start, each bucket's load, finish), some of them still running; empty when the sync
    finished before returning. Generation must wait for them (``rollout_worker.wait_engine_calls``)."""


class WeightSync:
    """Pushes the actor's weights into vLLM; construct (and connect, sync) on every trainer rank."""

    def __init__(self, engine: Any | None, config: WeightSyncConfig = WeightSyncConfig()):
        self.rank = torch.distributed.get_rank()
        self.is_sender = self.rank == 0
        if self.is_sender and engine is None:
            raise ValueError("global rank 0 must hold the rollout engine")
        self.engine = engine if self.is_sender else None
        self.config = config
        self.backend = engine.backend if self.is_sender else None
        if self.is_sender and self.backend not in TRANSPORTS:
            raise UnsupportedTransport(
                f"the engine was started with weight_transfer_backend={self.backend!r}; weight sync "
                f"needs one of {', '.join(TRANSPORTS)}"
            )
        self.transfer: Any | None = None
        self.source: Any | None = None
        self._reconnect = False
        """Set by an aborted sync: the next sync opens a new transport first."""

    @property
    def connected(self) -> bool:
        return self.transfer is not None

    def _init_info(self, backend: str, workers: int):
        bucket = self.config.bucket_bytes
        if backend == shm_transfer.BACKEND_NAME:
            return shm_transfer.build_trainer_classes()[0](bucket_bytes=bucket, rank=self.rank)
        from megatron_rlhf.parallel.launch import free_port

        port = free_port() if self.is_sender else 0  # only the sender opens an endpoint
        if backend == gloo_transfer.BACKEND_NAME:
            return gloo_transfer.build_trainer_classes()[0](
                master_address=self.config.host, master_port=port, world_size=1 + workers,
                bucket_bytes=bucket, rank=self.rank)
        if backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            return NCCLTrainerInitInfo(master_address=self.config.host, master_port=port,
                                       world_size=1 + workers, packed=True,
                                       packed_buffer_size_bytes=bucket, rank=self.rank)
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=bucket, rank=self.rank)

    def connect(self) -> None:
        """Open the transport (``trainer_init`` on every trainer rank; a collective)."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from megatron_rlhf.rollout.weight_source import EngineClient, megatron_weight_source

        self.shutdown()  # reconnecting replaces the transport
        header = [self.backend, self.engine.config.dtype, self.engine.config.tensor_parallel] \
            if self.is_sender else [None, None, None]
        torch.distributed.broadcast_object_list(header, src=0)
        backend, dtype_name, workers = header
        if backend in GPU_TRANSPORTS and not torch.cuda.is_available():
            raise UnsupportedTransport(f"weight_transfer_backend={backend!r} needs CUDA on every trainer rank")
        from megatron_rlhf.rollout.vllm_plugin import register_trainer_engines

        register_trainer_engines()
        # Host transports stage buckets in CPU memory; nccl / ipc send from the model's GPU.
        self.source = megatron_weight_source(getattr(torch, dtype_name),
                                             device=None if backend in GPU_TRANSPORTS else "cpu",
                                             # only rank 0 sends (gather there only), except vLLM's
                                             # CUDA-IPC engine, which packs every rank's tensors
                                             only_rank0=backend != "ipc")
        client = EngineClient(self.engine) if self.is_sender else None
        self.transfer = WeightTransferTrainerFactory.trainer_init(
            self._init_info(backend, int(workers)), client=client, source=self.source)

    def shutdown(self) -> None:
        """Close the transport (``shm``: unlink the segment, workers unmap it). Idempotent."""
        transfer, self.transfer = self.transfer, None
        if transfer is not None:
            transfer.shutdown()

    @property
    def can_defer(self) -> bool:
        """Whether ``sync(wait=False)`` leaves the engine loading: the ``shm`` transport to an
        engine in another process. Elsewhere the sync finishes before it returns."""
        return hasattr(self.transfer, "pending_refs") and bool(getattr(self.transfer.client, "remote", False))

    @torch.no_grad()
    def sync(self, model: torch.nn.Module, arch: Any, role: str = "lm", wait: bool = True) -> SyncReport:
        """Stream ``model``'s weights into the engine; a collective over all trainer ranks.

        ``wait=False``: where :attr:`can_defer`, return once the weights are copied out of the
        model, the engine's loads still running (``SyncReport.pending``; the next sync waits for
        them and reports their failure as its own); the model may be trained on at once.
        """
        if self.transfer is None and self._reconnect:
            self.connect()  # the previous sync was aborted; a collective, as sync is
        if self.transfer is None:
            raise RuntimeError("WeightSync.sync called before connect() (or after shutdown)")
        start = time.perf_counter()
        self.source.bind(model, arch, role)
        try:
            defer = not wait and self.is_sender and self.can_defer
            stats = self.transfer.send_weights(wait=False) if defer else self.transfer.send_weights()
        except BaseException as failure:
            message = self._abort(failure)
            if isinstance(failure, Exception):
                raise WeightSyncAborted(message) from failure
            raise
        if stats is None:  # vLLM's engines report nothing: count what the source declared
            meta = self.source.metadata()
            size = sum(torch.Size(m.shape).numel() * m.dtype.itemsize for m in meta)
            numbers = [time.perf_counter() - start, size, len(meta), 0, 0]
        else:
            numbers = [time.perf_counter() - start, stats.bytes, stats.tensors, stats.buckets,
                       stats.largest_bucket_bytes]
        torch.distributed.broadcast_object_list(numbers, src=0)
        pending = tuple(self.transfer.pending_refs()) if self.is_sender and defer else ()
        return SyncReport(float(numbers[0]), int(numbers[1]), int(numbers[2]), int(numbers[3]), int(numbers[4]),
                          pending)

    def _abort(self, failure: BaseException) -> str:
        """Close the transport and the engine's half-done update; the report of what happened.

        Runs on the rank that failed; the engine side only on the sender (it holds the engine).
        """
        from megatron_rlhf.rollout.weight_source import EngineClient

        transfer, self.transfer = self.transfer, None
        self._reconnect = True
        engine_state = "the engine is held by global rank 0"
        if self.is_sender:  # first close the workers' update, then their transport
            try:
                restored = EngineClient(self.engine).abort_weight_update()
                engine_state = (f"the engine's update was aborted ({restored} unfinished layer(s) put back to their "
                                "previous weights; layers finished before the failure hold the new ones until "
                                "the next sync)")
            except Exception as error:
                engine_state = f"the engine's update could not be aborted ({error}); restart the engine"
        try:
            transfer.shutdown()
        except Exception as error:  # keep the sync's own error
            log.warning("closing the weight transport after a failed sync: %s", error)
        message = (f"weight sync failed on rank {self.rank}: {type(failure).__name__}: {failure}; {engine_state}; "
                   "the next sync reconnects and sends every weight again")
        log.error("%s", message)
        return message


class WeightSyncFanout:
    """Every weight sync goes to every rollout engine: one :class:`WeightSync` per engine, synced
    in turn (each a full pass over the model; construct, connect and sync on every trainer rank).

    ``engines``: the engines on global rank 0, None elsewhere; ``count``: how many there are
    (every rank must know it, since each sync is a collective).
    """

    def __init__(self, engines: list[Any] | None, count: int, config: WeightSyncConfig = WeightSyncConfig()):
        if count < 1 or (engines is not None and len(engines) != count):
            raise ValueError(f"WeightSyncFanout: {count} engines expected, got {engines!r}")
        self.syncs = [WeightSync(engines[i] if engines is not None else None, config) for i in range(count)]

    def connect(self) -> None:
        for sync in self.syncs:
            sync.connect()

    def shutdown(self) -> None:
        for sync in self.syncs:
            sync.shutdown()

    def sync(self, model: torch.nn.Module, arch: Any, role: str = "lm", wait: bool = True) -> SyncReport:
        """Sync every engine; the report sums seconds, bytes, tensors and buckets over them
        (``wait=False``: one engine loads while the next one's buckets are packed)."""
        reports = [sync.sync(model, arch, role, wait=wait) for sync in self.syncs]
        return SyncReport(sum(r.seconds for r in reports), sum(r.bytes for r in reports),
                          sum(r.tensors for r in reports), sum(r.buckets for r in reports),
                          max(r.largest_bucket_bytes for r in reports),
                          tuple(ref for r in reports for ref in r.pending))
