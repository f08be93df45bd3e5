"""The trainer side of vLLM's weight-transfer API, as Megatron sees it: a source, a client, buckets.

vLLM (0.32+) splits a live weight update into a *trainer engine* per transport
(``TrainerWeightTransferEngine``: ``trainer_init`` on every trainer rank, then ``send_weights``
per update), a ``WeightSource`` the engine iterates, and a ``VLLMWeightSyncClient`` that drives
the inference side (``init_weight_transfer_engine``, ``start_weight_update``,
``update_weights``, ``finish_weight_update``). This module provides the two Megatron-specific
pieces, used with vLLM's own ``nccl`` / ``ipc`` trainer engines and with this package's ``gloo``
/ ``shm`` ones alike:

- :func:`megatron_weight_source`: the actor's weights in HF naming, streamed through
  :func:`megatron_rlhf.mapping.engine.export_hf_weights` (TP shards gathered, PP stages and EP
  experts broadcast; for the weight sync gathered onto the sending rank 0 only, other ranks
  seeing ``meta`` stand-ins), cast to the engine's dtype, on every trainer rank in the same order. Each
  iteration is a collective over the trainer ranks. ``metadata()`` (names, dtypes, full shapes)
  is one such pass, cached until the source is bound to another model.
- :class:`EngineClient`: the client over a :class:`~megatron_rlhf.rollout.engine.RolloutEngine`
  (or the disaggregated ``RemoteEngine``), i.e. vLLM's ``collective_rpc`` to its workers.

And :func:`iter_buckets`, the bucketing this package's transports share: a bucket is cut before
it would exceed ``bucket_bytes`` (so it is larger only when one tensor is) and, where a layer
fits, between layers.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


def payload_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class TransferStats:
    """What one ``send_weights`` moved (payload bytes, alignment padding not counted)."""

    bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    largest_bucket_bytes: int = 0

    def add_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        size = sum(payload_bytes(tensor) for _, tensor in bucket)
        self.bytes += size
        self.tensors += len(bucket)
        self.buckets += 1
        self.largest_bucket_bytes = max(self.largest_bucket_bytes, size)

    @classmethod
    def iterated(cls, source: Iterable[Any]) -> TransferStats:
        """A non-sender rank's share: it only walks the source (the export's collectives)."""
        return cls(tensors=sum(1 for _ in source))


def layer_key(name: str) -> str:
    """The transformer layer an HF name belongs to (the prefix through its outermost index, as
    vLLM's ``layerwise_groups``), or the name itself for un-indexed tensors (embeddings, norms)."""
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: position + 1])
    return name


def iter_buckets(pairs: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 size_of: Callable[[torch.Tensor], int] = payload_bytes,
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``pairs`` into buckets of at most ``bucket_bytes`` (by ``size_of``), in order.

    A layer's tensors (:func:`layer_key`) stay in one bucket unless the layer alone is larger
    than a bucket: vLLM's layerwise reload processes a layer when its last tensor arrives and
    until then holds the earlier ones, so whole layers per bucket let the receiver drop (or
    reuse) a bucket as soon as it is loaded. Holds at most one bucket and one layer.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    filled = 0
    layer: list[tuple[str, torch.Tensor, int]] = []
    current = None

    def place(group: list[tuple[str, torch.Tensor, int]]):
        nonlocal bucket, filled
        if bucket and filled + sum(size for _, _, size in group) > bucket_bytes:
            yield bucket
            bucket, filled = [], 0
        for name, tensor, size in group:  # a layer larger than a bucket is split by tensor
            if bucket and filled + size > bucket_bytes:
                yield bucket
                bucket, filled = [], 0
            bucket.append((name, tensor))
            filled += size

    for name, tensor in pairs:
        key = layer_key(name)
        if key != current and layer:
            yield from place(layer)
            layer = []
        current = key
        layer.append((name, tensor, size_of(tensor)))
    if layer:
        yield from place(layer)
    if bucket:
        yield bucket


class EngineClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over an engine's ``llm.collective_rpc``.

    :meth:`submit` starts a call without waiting for it; calls run one at a time in the order
    they were submitted (a local engine's on one helper thread; a disaggregated engine's as Ray
    tasks from this one caller to its one-at-a-time actor, whose handles other processes may
    wait on: ``ref``).
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self._local_calls: ThreadPoolExecutor | None = None

    @property
    def alive(self) -> bool:
        """False once the engine was shut down (its ``llm`` dropped): nothing left to tell."""
        return getattr(self.engine, "llm", None) is not None

    @property
    def remote(self) -> bool:
        """The engine runs in another process and its calls are Ray tasks (``llm.submit``)."""
        return hasattr(getattr(self.engine, "llm", None), "submit")

    def _call(self, method: str, **kwargs: Any) -> None:
        self.engine.llm.collective_rpc(method, kwargs=kwargs or None)

    def submit(self, method: str, **kwargs: Any) -> Any:
        """Start ``method`` on the engine's workers; a call whose ``result()`` waits for it."""
        if self.remote:
            return self.engine.llm.submit(method, kwargs or None)
        if self._local_calls is None:
            self._local_calls = ThreadPoolExecutor(1, thread_name_prefix="engine-rpc")
        return self._local_calls.submit(self._call, method, **kwargs)

    def close(self) -> None:
        """Stop the local helper thread (after the calls submitted so far). Idempotent."""
        calls, self._local_calls = self._local_calls, None
        if calls is not None:
            calls.shutdown(wait=True)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("init_weight_transfer_engine", init_info=init_info)

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._call("update_weights", update_info=update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish_weight_update")

    def shutdown_weight_transfer_engine(self) -> None:
        self._call("shutdown_weight_transfer_engine")

    def abort_weight_update(self) -> int:
        """Close the workers' half-done update (see :mod:`.layerwise_reload`); returns the layers
        put back to their previous weights, summed over the workers."""
        return sum(self.engine.llm.collective_rpc("abort_weight_update") or [])


@functools.cache
def _source_class():
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    from megatron_rlhf.mapping.engine import export_hf_weights

    class MegatronWeightSource(WeightSource):
        """The bound Megatron model's weights in HF naming (see the module docstring)."""

        def __init__(self, dtype: torch.dtype, device: str | None, only_rank0: bool = False):
            self.dtype = dtype
            self.device = device
            self.only_rank0 = only_rank0
            self._model: tuple[Any, Any, str] | None = None
            self._metadata: list[ParamMeta] | None = None

        def bind(self, model: torch.nn.Module, arch: Any, role: str) -> None:
            """Stream ``model`` (an ``ArchSpec`` and mapping role) from now on."""
            if self._model is None or self._model[0] is not model or self._model[1:] != (arch, role):
                self._metadata = None
            self._model = (model, arch, role)

        def metadata(self) -> list[ParamMeta]:
            if self._metadata is None:  # one collective export pass; shapes do not change
                self._metadata = [ParamMeta(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in self]
            return self._metadata

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            if self._model is None:
                raise RuntimeError("MegatronWeightSource iterated before bind(model, arch, role)")
            model, arch, role = self._model
            for name, tensor in export_hf_weights(model, arch, role, only_rank0=self.only_rank0):
                if tensor.is_meta:  # a non-sender's stand-in: name, shape and dtype, no data
                    yield name, tensor.to(dtype=self.dtype)
                else:
                    yield name, tensor.to(device=self.device or tensor.device, dtype=self.dtype)

    return MegatronWeightSource


def megatron_weight_source(dtype: torch.dtype, device: str | None = "cpu", only_rank0: bool = False):
    """A vLLM ``WeightSource`` over a Megatron model (``device=None`` keeps the model's device).

    ``only_rank0``: tensors are gathered onto global rank 0 (the sender) alone; the other ranks
    iterate ``meta`` tensors with the same names, shapes and dtypes (vLLM's non-sender ranks
    only walk the source), so no rank but the sender holds a full tensor."""
    return _source_class()(dtype, device, only_rank0)
