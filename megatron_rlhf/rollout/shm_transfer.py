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

- ``trainer_init``: the sender creates one segment (:class:`SharedSegment`, ``bucket_bytes``
  large) and ``init_weight_transfer_engine`` tells the workers its name; each worker maps it
  read-only and fails at once if it cannot (another host, a private ``/dev/shm``);
- per bucket: the sender packs the tensors back to back (64-byte aligned) into the segment and
  calls ``update_weights`` with the bucket's layout (``names``, ``dtype_names``, ``shapes``,
  ``offsets``, ``num_bytes``, and the segment's name and size); each worker copies the tensors
  out of the segment and loads them through vLLM's layerwise reload, exactly as the gloo
  backend does (``start_weight_update`` / ``finish_weight_update``);
- the RPC returns only after every worker has copied the bucket, so the sender reuses the
  segment for the next bucket; a bucket with one tensor larger than the segment replaces it
  by a larger one (new name, carried in the update info; workers re-map).

Guarantees: shared memory only, never a file on disk; one segment per sender, at most the
largest bucket in size; the segment is unlinked by ``WeightSync.shutdown``, when a sync raises,
and, failing those, when the sender process exits (a ``multiprocessing`` finalizer, and the
resource tracker behind it); free space in ``/dev/shm`` is checked before the segment is
created or grown (writing past a full tmpfs would kill the trainer with SIGBUS); workers map the
segment read-only and copy out of it, so the next bucket cannot change weights already loaded.

Not guaranteed: anything across hosts (use ``gloo``); a ``/dev/shm`` large enough (Docker's
default is 64 MiB: lower ``bucket_bytes`` or raise ``--shm-size``); clean-up after SIGKILL of
the whole process tree: a ``megatron_rlhf_sync_<pid>_*`` segment then remains in ``/dev/shm``
until the next sender on the host starts and removes segments whose pid is not running
(:func:`remove_orphaned_segments`). Linux only (workers map ``/dev/shm/<name>``).
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from multiprocessing import shared_memory, util
from pathlib import Path
from typing import Any, ClassVar

import torch

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


def pack_bucket_into(tensors: list[tuple[str, torch.Tensor]], segment: torch.Tensor) -> dict[str, Any]:
    """Write ``tensors`` into ``segment`` (uint8) at :func:`bucket_layout`'s offsets; its info.

    One copy per tensor, straight into shared memory (``pack_bucket`` would first concatenate
    into a private buffer: one more copy of every bucket).
    """
    info = bucket_layout(tensors)
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
    try:
        segment.close()
    except BufferError:  # a view still exports the buffer; unlinking is what frees the name
        pass
    try:
        segment.unlink()
    except FileNotFoundError:
        pass


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_orphaned_segments() -> list[str]:
    """Unlink segments left by senders that died without clean-up (SIGKILL); their names.

    A segment's name carries its creator's pid (``megatron_rlhf_sync_<pid>_<random>``); one
    whose pid no longer runs in this pid namespace can have no sender, and its workers copied
    every bucket out of it already. Called before a sender creates its own segment.
    """
    removed = []
    for path in Path(SHM_DIR).glob(f"{SEGMENT_PREFIX}*"):
        owner = path.name[len(SEGMENT_PREFIX):].split("_")[0]
        if not owner.isdigit() or _pid_alive(int(owner)):
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
    """Map an existing segment read-only (worker side); a clear error when it is not here."""
    path = os.path.join(SHM_DIR, name)
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError as error:
        raise RuntimeError(
            f"shared-memory segment {path} not found: the 'shm' weight transfer needs the trainer and "
            "the vLLM workers on the same host (and the same /dev/shm); use weight_transfer_backend='gloo'"
        ) from error
    try:
        mapping = mmap.mmap(descriptor, num_bytes, prot=mmap.PROT_READ)
    finally:
        os.close(descriptor)
    with warnings.catch_warnings():  # read-only buffer: every use below copies out of it
        warnings.simplefilter("ignore", UserWarning)
        view = torch.frombuffer(mapping, dtype=torch.uint8, count=num_bytes)
    return mapping, view


def build_engine_classes():
    """Define the worker-side engine against the installed vLLM (imported lazily)."""
    from vllm.distributed.weight_transfer.base import WeightTransferInitInfo, WeightTransferUpdateInfo

    from megatron_rlhf.rollout.layerwise_reload import reload_engine_base

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
        """Worker side: copy each bucket out of the shared segment, load it with ``load_weights``."""

        init_info_cls = ShmWeightTransferInitInfo
        update_info_cls = ShmWeightTransferUpdateInfo

        def __init__(self, config, vllm_config, device, model) -> None:
            super().__init__(config, vllm_config, device, model)
            self.segment_name: str | None = None
            self.mapping: mmap.mmap | None = None
            self.view: torch.Tensor | None = None

        def _attach(self, name: str, num_bytes: int) -> None:
            self.shutdown()
            self.mapping, self.view = attach_segment(name, num_bytes)
            self.segment_name = name

        def init_transfer_engine(self, init_info) -> None:
            self._attach(init_info.segment_name, init_info.segment_bytes)

        def receive_weights(self, update_info) -> None:
            if self.view is None:
                raise RuntimeError("shm weight transfer used before init_weight_transfer_engine")
            if update_info.segment_name != self.segment_name:  # the sender grew its segment
                self._attach(update_info.segment_name, update_info.segment_bytes)
            views = unpack_bucket_views(self.view, update_info.names, update_info.dtype_names,
                                        update_info.shapes, update_info.offsets)
            # Copies: layerwise reload keeps tensors until a layer is complete, and the sender
            # overwrites the segment with the next bucket as soon as this call returns.
            self.model.load_weights([(name, view.to(self.device, copy=True)) for name, view in views])

        def shutdown(self) -> None:
            self.view = None
            if self.mapping is not None:
                self.mapping.close()
            self.mapping, self.segment_name = None, None

    return ShmWeightTransferEngine


@functools.cache
def build_trainer_classes():
    """Define the trainer-side engine (vLLM's ``TrainerWeightTransferEngine``) lazily."""
    from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine

    from megatron_rlhf.rollout.weight_source import TransferStats, iter_buckets

    @dataclass
    class ShmTrainerInitInfo(TrainerInitInfo):
        backend: ClassVar[str] = BACKEND_NAME
        bucket_bytes: int = 64 * 1024**2

    class ShmTrainerWeightTransferEngine(TrainerWeightTransferEngine):
        """Sender (trainer rank 0): write each bucket into the segment, then let the workers load it.

        Other trainer ranks only iterate the source (the export's collectives). A send that
        raises unlinks the segment: the engine is then unusable until ``trainer_init`` again.
        """

        init_info_cls = ShmTrainerInitInfo

        def __init__(self, *, client, source, is_sender: bool = True, bucket_bytes: int = 64 * 1024**2):
            super().__init__(client=client, source=source, is_sender=is_sender)
            self.bucket_bytes = bucket_bytes
            self.segment: SharedSegment | None = None

        @classmethod
        def trainer_init(cls, init_info, *, client, source=None):
            if source is None:
                raise ValueError("the shm trainer engine needs a WeightSource")
            engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                         bucket_bytes=init_info.bucket_bytes)
            if engine.is_sender:
                remove_orphaned_segments()
                engine.segment = SharedSegment(init_info.bucket_bytes)
                try:
                    client.init_weight_transfer_engine({"segment_name": engine.segment.name,
                                                        "segment_bytes": engine.segment.num_bytes})
                except BaseException:
                    engine.segment.unlink()
                    raise
            return engine

        def send_weights(self) -> TransferStats:
            if not self.is_sender:
                return TransferStats(0, sum(1 for _ in self.source), 0, 0)
            if self.segment is None:
                raise RuntimeError("shm weight transfer used after a failed send or shutdown; "
                                   "call trainer_init (WeightSync.connect) again")
            total = tensors = buckets = largest = 0
            try:
                self.client.start_weight_update()
                for bucket in iter_buckets(self.source, self.bucket_bytes, aligned_nbytes):
                    info = bucket_layout(bucket)
                    self.segment.ensure(info["num_bytes"])
                    pack_bucket_into(bucket, self.segment.view)
                    info.update(segment_name=self.segment.name, segment_bytes=self.segment.num_bytes)
                    # Returns once every worker has loaded the bucket: the segment is free again.
                    self.client.update_weights(info)
                    sent = sum(t.numel() * t.element_size() for _, t in bucket)
                    total, tensors, buckets, largest = total + sent, tensors + len(bucket), buckets + 1, max(largest, sent)
                self.client.finish_weight_update()
            except BaseException:
                # Never leave a segment behind a failed send; the workers' update is still open,
                # so they keep their mapping until the next init or their exit.
                self.segment.unlink()
                self.segment = None
                raise
            return TransferStats(total, tensors, buckets, largest)

        def shutdown(self) -> None:
            segment, self.segment = self.segment, None
            if segment is None:
                return
            segment.unlink()
            if getattr(self.client, "alive", True):  # an engine already shut down needs nothing
                try:
                    self.client.shutdown_weight_transfer_engine()
                except Exception as error:  # the segment is gone either way; workers unmap at exit
                    log.warning("vLLM workers did not release the weight-transfer segment: %s", error)

    return ShmTrainerInitInfo, ShmTrainerWeightTransferEngine
