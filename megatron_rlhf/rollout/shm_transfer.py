"""An ``shm`` backend for vLLM's weight-transfer API: trainer -> vLLM workers on the same host.

Why: on CPU machines the ``gloo`` backend (:mod:`megatron_rlhf.rollout.gloo_transfer`) pushes
every bucket through loopback TCP, which made a sync cost about as much as a disk round trip
(``benchmarks/results/weight_sync_cpu.md``). When the trainer's sender and the vLLM workers
share a host, a POSIX shared-memory segment (the CPU analogue of vLLM's CUDA-IPC backend)
removes that leg: the sender writes each bucket into the segment once, the workers read it.

Both sides live here: the worker engine (:func:`build_engine_classes`, registered in vLLM's
processes by :mod:`~megatron_rlhf.rollout.vllm_plugin`) and the trainer engine
(:func:`build_trainer_classes`, vLLM's ``TrainerWeightTransferEngine`` interface, driven by
:class:`megatron_rlhf.rollout.weight_sync.WeightSync`). Protocol:

- ``trainer_init``: the sender creates ``num_buffers`` segments (:class:`SharedSegment`, 2 by
  default, ``bucket_bytes`` each) and ``init_weight_transfer_engine`` names one to the workers,
  which fail at once if they cannot map it (another host, a private ``/dev/shm``);
- per bucket: the sender packs the tensors back to back (64-byte aligned) into the next segment
  in turn and calls ``update_weights`` (without waiting: :meth:`EngineClient.submit`) with the bucket's layout (``names``,
  ``dtype_names``, ``shapes``, ``offsets``, ``num_bytes``, and the segment's name and size);
  each worker maps that segment copy-on-write and loads views of it through vLLM's layerwise
  reload (``start_weight_update`` / ``finish_weight_update``, as the gloo backend), copying out
  only what the reload still buffers when the call returns;
- the RPC returns only after every worker has loaded the bucket, and a segment is packed again
  only after the RPC of the bucket it held returned, so with two segments packing overlaps
  loading; a bucket with one tensor larger than its segment replaces it by a larger one (new
  name, carried in the update info);
- an engine in another process (a Ray actor) may be left loading: ``send_weights(wait=False)``
  returns once the last bucket is packed, and the next send, or the shutdown, waits for the
  loads first (the one-step-off schedule overlaps them with the next update this way).

Guarantees: shared memory only, never a file on disk; ``num_buffers`` segments per sender, each
at most the largest bucket in size; the segments are unlinked by ``WeightSync.shutdown``, when a sync raises,
and, failing those, when the sender process exits (a ``multiprocessing`` finalizer, and the
resource tracker behind it); free space in ``/dev/shm`` is checked before the segment is
created or grown (writing past a full tmpfs would kill the trainer with SIGBUS); workers map the
segment copy-on-write per bucket and copy out whatever vLLM still holds after it, so neither the
next bucket can change weights already loaded nor a worker's in-place write reach the segment.

Not guaranteed: anything across hosts (use ``gloo``); a ``/dev/shm`` large enough (Docker's
default is 64 MiB: lower ``bucket_bytes`` or raise ``--shm-size``); clean-up after SIGKILL of
the whole process tree: a ``megatron_rlhf_sync_<pid>_*`` segment then remains in ``/dev/shm``
until the next sender on the host starts and removes segments whose pid is not running
(:func:`remove_orphaned_segments`). Linux only (workers map ``/dev/shm/<name>``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
import os
import shutil
import uuid
from dataclasses import dataclass
from multiprocessing import shared_memory, util
from pathlib import Path
from typing import Any, ClassVar

import torch

from megatron_rlhf.parallel.ipc_orphans import pid_alive

log = logging.getLogger(__name__)
BACKEND_NAME = "shm"
SEGMENT_PREFIX = "megatron_rlhf_sync_"
SHM_DIR = "/dev/shm"
ALIGNMENT = 64
"""Byte alignment of every tensor in the segment (cache line; any dtype view is legal)."""


def aligned_nbytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` occupies in a bucket, padding included."""
    nbytes = tensor.numel() * tensor.element_size()
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def bucket_layout(tensors: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """The update info of a bucket: same naming as ``gloo_transfer.pack_bucket`` plus offsets."""
    offsets, offset = [], 0
    for _, tensor in tensors:
        offsets.append(offset)
        offset += aligned_nbytes(tensor)
    return {
        "names": [name for name, _ in tensors],
        "dtype_names": [str(t.dtype).split(".")[-1] for _, t in tensors],
        "shapes": [list(t.shape) for _, t in tensors],
        "offsets": offsets,
        "num_bytes": offset,
    }


def pack_bucket_into(tensors: list[tuple[str, torch.Tensor]], segment: torch.Tensor,
                     info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``tensors`` into ``segment`` (uint8) at :func:`bucket_layout`'s offsets; its info
    (``info``: that layout, when the caller computed it already).

    One copy per tensor, straight into shared memory (``pack_bucket`` would first concatenate
    into a private buffer: one more copy of every bucket).
    """
    info = info if info is not None else bucket_layout(tensors)
    if info["num_bytes"] > segment.numel():
        raise ValueError(f"bucket needs {info['num_bytes']} bytes; the segment has {segment.numel()}")
    for (_, tensor), offset in zip(tensors, info["offsets"]):
        flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
        segment[offset : offset + flat.numel()].copy_(flat)
    return info


def unpack_bucket_views(segment: torch.Tensor, names: list[str], dtype_names: list[str],
                        shapes: list[list[int]], offsets: list[int]) -> list[tuple[str, torch.Tensor]]:
    """Views of ``segment`` (uint8) as the named tensors (valid until the next bucket)."""
    views = []
    for name, dtype_name, shape, offset in zip(names, dtype_names, shapes, offsets):
        dtype = getattr(torch, dtype_name)
        count = 1
        for dim in shape:
            count *= int(dim)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if offset % ALIGNMENT or offset + nbytes > segment.numel():
            raise ValueError(f"{name}: offset {offset} + {nbytes} bytes outside a {segment.numel()}-byte segment")
        views.append((name, segment[offset : offset + nbytes].view(dtype).view(shape)))
    return views


def _check_free_space(num_bytes: int) -> None:
    free = shutil.disk_usage(SHM_DIR).free
    if num_bytes > free:
        raise ValueError(
            f"weight sync over 'shm' needs a {num_bytes}-byte segment but {SHM_DIR} has {free} bytes "
            "free: lower WeightSyncConfig.bucket_bytes, enlarge /dev/shm (docker --shm-size), or use "
            "weight_transfer_backend='gloo'"
        )


def _unlink_quietly(segment: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(BufferError):  # a view still exports the buffer; unlink frees the name
        segment.close()
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()


class SharedSegment:
    """The sender's segment: created here, grown on demand, unlinked by :meth:`unlink`."""

    def __init__(self, num_bytes: int):
        self._segment: shared_memory.SharedMemory | None = None
        self._finalizer: util.Finalize | None = None
        self.view = torch.empty(0, dtype=torch.uint8)
        self._create(max(int(num_bytes), ALIGNMENT))

    @property
    def name(self) -> str:
        if self._segment is None:
            raise RuntimeError("the shared-memory segment was unlinked")
        return self._segment.name

    @property
    def num_bytes(self) -> int:
        return int(self.view.numel())

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    def _create(self, num_bytes: int) -> None:
        _check_free_space(num_bytes)
        name = f"{SEGMENT_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"
        segment = shared_memory.SharedMemory(name=name, create=True, size=num_bytes)
        self._segment = segment
        # Runs at process exit (multiprocessing children included) unless unlink() ran first.
        self._finalizer = util.Finalize(self, _unlink_quietly, args=(segment,), exitpriority=10)
        self.view = torch.frombuffer(segment.buf, dtype=torch.uint8, count=num_bytes)

    def ensure(self, num_bytes: int) -> bool:
        """Make room for ``num_bytes``: a larger segment (new name) if needed; True if replaced."""
        if num_bytes <= self.num_bytes:
            return False
        self.unlink()
        self._create(num_bytes)
        return True

    def unlink(self) -> None:
        """Release the mapping and remove the name from ``/dev/shm``. Idempotent."""
        self.view = torch.empty(0, dtype=torch.uint8)  # drop the export before close()
        if self._finalizer is not None:
            self._finalizer()  # runs _unlink_quietly once and disarms the exit hook
        self._segment, self._finalizer = None, None


def remove_orphaned_segments() -> list[str]:
    """Unlink segments left by senders that died without clean-up (SIGKILL); their names.

    A segment's name carries its creator's pid (``megatron_rlhf_sync_<pid>_<random>``); one
    whose pid no longer runs in this pid namespace can have no sender, and its workers copied
    every bucket out of it already. Called before a sender creates its own segment.
    """
    removed = []
    for path in Path(SHM_DIR).glob(f"{SEGMENT_PREFIX}*"):
        owner = path.name[len(SEGMENT_PREFIX):].split("_")[0]
        if not owner.isdigit() or pid_alive(int(owner)):
            continue
        try:
            path.unlink()
        except (FileNotFoundError, PermissionError):  # gone already, or another user's
            continue
        removed.append(path.name)
    if removed:
        log.info("removed %d weight-sync segment(s) left in %s by dead processes: %s",
                 len(removed), SHM_DIR, ", ".join(removed))
    return removed


def attach_segment(name: str, num_bytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Map an existing segment copy-on-write (worker side); a clear error when it is not here.

    ``MAP_PRIVATE``: pages this process never writes show the sender's current bytes; a write
    (a weight loader modifying its input in place) lands in a private copy, never in the segment
    the other workers read. Mapped per bucket, so no private copy outlives a bucket.
    """
    path = os.path.join(SHM_DIR, name)
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError as error:
        raise RuntimeError(
            f"shared-memory segment {path} not found: the 'shm' weight transfer needs the trainer and "
            "the vLLM workers on the same host (and the same /dev/shm); use weight_transfer_backend='gloo'"
        ) from error
    try:
        # No MAP_POPULATE: on a private writable mapping it would pre-fault for writing, i.e.
        # copy every page; read faults map the shared pages themselves.
        mapping = mmap.mmap(descriptor, num_bytes, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(descriptor)
    return mapping, torch.frombuffer(mapping, dtype=torch.uint8, count=num_bytes)


def build_engine_classes():
    """Define the worker-side engine against the installed vLLM (imported lazily)."""
    from vllm.distributed.weight_transfer.base import WeightTransferInitInfo, WeightTransferUpdateInfo

    from megatron_rlhf.rollout.layerwise_reload import (
        buffered_weights_inspectable,
        copy_buffered_weights,
        reload_engine_base,
    )

    @dataclass
    class ShmWeightTransferInitInfo(WeightTransferInitInfo):
        segment_name: str
        segment_bytes: int

    @dataclass
    class ShmWeightTransferUpdateInfo(WeightTransferUpdateInfo):
        segment_name: str
        segment_bytes: int
        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]
        offsets: list[int]
        num_bytes: int

    class ShmWeightTransferEngine(reload_engine_base()):
        """Worker side: load each bucket straight from a mapping of the segment.

        On a CPU device the tensors handed to ``load_weights`` are views of the mapping (no copy);
        whatever vLLM's layerwise reload still buffers when the call returns (a layer whose
        tensors continue in the next bucket, padded layers processed at the end) is copied out
        then, since the sender overwrites the segment with the next bucket. Other devices, or a
        vLLM whose layerwise buffers cannot be inspected, copy every tensor.
        """

        init_info_cls = ShmWeightTransferInitInfo
        update_info_cls = ShmWeightTransferUpdateInfo

        def __init__(self, config, vllm_config, device, model) -> None:
            super().__init__(config, vllm_config, device, model)
            self.segment_name: str | None = None
            self.zero_copy = torch.device(device).type == "cpu" and buffered_weights_inspectable()

        def init_transfer_engine(self, init_info) -> None:
            # Fail at once when the segment is not on this host; buckets map it again each time.
            mapping, view = attach_segment(init_info.segment_name, init_info.segment_bytes)
            del view
            mapping.close()
            self.segment_name = init_info.segment_name

        def receive_weights(self, update_info) -> None:
            if self.segment_name is None:
                raise RuntimeError("shm weight transfer used before init_weight_transfer_engine")
            self.segment_name = update_info.segment_name  # a new name when the sender grew it
            _, segment = attach_segment(update_info.segment_name, update_info.segment_bytes)
            views = unpack_bucket_views(segment, update_info.names, update_info.dtype_names,
                                        update_info.shapes, update_info.offsets)
            if not self.zero_copy:
                self.model.load_weights([(name, view.to(self.device, copy=True)) for name, view in views])
                return
            self.model.load_weights(views)
            copy_buffered_weights(self.model, segment)
            # The mapping is unmapped when its last view is released (on return).

        def shutdown(self) -> None:
            self.segment_name = None

    return ShmWeightTransferEngine


def _wait_all(calls: list) -> None:
    """Wait for every call; then raise the first failure, if any."""
    failure = None
    for call in calls:
        try:
            call.result()
        except BaseException as error:  # noqa: BLE001 - re-raised below, after the rest returned
            failure = failure or error
    if failure is not None:
        raise failure


@functools.cache
def build_trainer_classes():
    """Define the trainer-side engine (vLLM's ``TrainerWeightTransferEngine``) lazily."""
    from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

    from megatron_rlhf.rollout.weight_source import TransferStats, iter_buckets

    @dataclass
    class ShmTrainerInitInfo(TrainerInitInfo):
        backend: ClassVar[str] = BACKEND_NAME
        bucket_bytes: int = 64 * 1024**2
        num_buffers: int = 2
        """Segments the sender cycles through: with 2, it packs the next bucket while the workers
        load the previous one (``/dev/shm`` holds ``num_buffers`` buckets)."""

    class ShmTrainerWeightTransferEngine(TrainerWeightTransferEngine):
        """Sender (trainer rank 0): pack buckets into the segments in turn, workers load each.

        ``update_weights`` runs on a helper thread, so packing bucket k+1 overlaps the workers'
        loading of bucket k; a segment is reused only after the workers returned from the bucket
        it held. Other trainer ranks only iterate the source (the export's collectives). A send
        that raises unlinks the segments: the engine is unusable until ``trainer_init`` again.
        """

        init_info_cls = ShmTrainerInitInfo

        def __init__(self, *, client, source, is_sender: bool = True, bucket_bytes: int = 64 * 1024**2,
                     num_buffers: int = 2):
            super().__init__(client=client, source=source, is_sender=is_sender)
            if num_buffers < 1:
                raise ValueError(f"num_buffers={num_buffers} must be >= 1")
            self.bucket_bytes = bucket_bytes
            self.num_buffers = num_buffers
            self.segments: list[SharedSegment] = []
            self.pending: list = []
            """Calls of the last ``send_weights(wait=False)`` still running on the engine."""

        @property
        def segment(self) -> SharedSegment | None:
            """The first segment (None once unlinked)."""
            return self.segments[0] if self.segments else None

        def _unlink_segments(self) -> None:
            segments, self.segments = self.segments, []
            for segment in segments:
                segment.unlink()

        @classmethod
        def trainer_init(cls, init_info, *, client, source=None):
            if source is None:
                raise ValueError("the shm trainer engine needs a WeightSource")
            engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                         bucket_bytes=init_info.bucket_bytes, num_buffers=init_info.num_buffers)
            if engine.is_sender:
                remove_orphaned_segments()
                try:
                    for _ in range(engine.num_buffers):
                        engine.segments.append(SharedSegment(init_info.bucket_bytes))
                    client.init_weight_transfer_engine({"segment_name": engine.segment.name,
                                                        "segment_bytes": engine.segment.num_bytes})
                except BaseException:
                    engine._unlink_segments()
                    raise
            return engine

        def send_weights(self, wait: bool = True) -> TransferStats:
            """Pack every bucket and have the workers load it.

            ``wait=False`` with an engine in another process (``client.remote``): return as soon
            as the last bucket is packed and its load requested; the workers' last loads and the
            update's end run on (:attr:`pending`, :meth:`pending_refs`), and the next send or
            :meth:`shutdown` waits for them first (raising what they raised). The weights may
            change once this returns: every byte the workers read is in the segments.
            """
            if not self.is_sender:
                return TransferStats.iterated(self.source)
            if not self.segments:
                raise RuntimeError("shm weight transfer used after a failed send or shutdown; "
                                   "call trainer_init (WeightSync.connect) again")
            stats = TransferStats()
            calls: list = []
            in_flight: list = [None] * len(self.segments)
            try:
                self.wait_pending()
                calls.append(self.client.submit("start_weight_update"))
                for index, bucket in enumerate(iter_buckets(self.source, self.bucket_bytes, aligned_nbytes)):
                    slot = index % len(self.segments)
                    if in_flight[slot] is not None:
                        in_flight[slot].result()  # the workers are done with this segment
                    segment = self.segments[slot]
                    info = bucket_layout(bucket)
                    segment.ensure(info["num_bytes"])
                    pack_bucket_into(bucket, segment.view, info)
                    info.update(segment_name=segment.name, segment_bytes=segment.num_bytes)
                    in_flight[slot] = self.client.submit("update_weights", update_info=info)
                    calls.append(in_flight[slot])
                    stats.add_bucket(bucket)
                calls.append(self.client.submit("finish_weight_update"))
                if wait or not self.client.remote:
                    _wait_all(calls)
                else:
                    self.pending = calls
            except BaseException:
                # First let the calls still in flight return: the caller's abort RPC follows.
                with contextlib.suppress(BaseException):
                    _wait_all(calls)
                # Never leave segments behind a failed send; the workers' update is still open.
                self._unlink_segments()
                raise
            finally:
                if not self.pending:
                    self.client.close()
            return stats

        def wait_pending(self) -> None:
            """Wait for the calls a ``send_weights(wait=False)`` left running (raises the first failure)."""
            calls, self.pending = self.pending, []
            _wait_all(calls)

        def pending_refs(self) -> list:
            """Ray handles of the last deferred send's calls, every one of them (for another process to wait on)."""
            return [call.ref for call in self.pending]

        def shutdown(self) -> None:
            if not self.segments:
                return
            try:
                self.wait_pending()
            except Exception as error:  # the segments go either way
                log.warning("the engine's last weight load failed: %s", error)
            self._unlink_segments()
            if getattr(self.client, "alive", True):  # an engine already shut down needs nothing
                try:
                    self.client.shutdown_weight_transfer_engine()
                except Exception as error:  # the segments are gone either way; workers unmap at exit
                    log.warning("vLLM workers did not release the weight-transfer segment: %s", error)

    return ShmTrainerInitInfo, ShmTrainerWeightTransferEngine
