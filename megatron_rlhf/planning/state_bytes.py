"""Bytes of weights, gradients and optimizer state that one rank holds under Megatron DDP.

Follows Megatron-Core's ``DistributedDataParallel`` and distributed optimizer exactly (checked on
CPU against the real model and optimizer at TP/PP/DP/EP layouts, ``tests/distributed/
test_planner_exact.py``):

- Parameters are grouped into buffers by (parameter dtype, gradient dtype), dense and expert
  parameters apart; each buffer lays its parameters out in reverse module order.
- With the distributed optimizer every parameter starts at a multiple of 64 elements, every
  bucket ends at a multiple of lcm(DP group size, 128), a split tied embedding gets its own
  bucket, and the weights themselves live in the (padded) buffer. Without it nothing is padded.
- Gradients: one buffer element per weight element (fp32 by default: ``grad_reduce_in_fp32``).
- Optimizer: each DP rank owns ``bucket / DP`` elements of every bucket; for the parameter
  elements in its range it keeps Adam's two moments (SGD: one momentum) in fp32, plus an fp32
  master copy when the parameter itself is not fp32. Dense buckets shard over DP x CP, expert
  buckets over the expert-data-parallel group. Adam's per-tensor ``step`` counters (scalars that
  live on the host) are not counted.

Pure arithmetic: no torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rlhf.planning.params import ParamTensor

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class TrainingPrecision:
    """Dtypes of the trained model's state."""

    params_dtype: str = "bf16"
    """fp32 | bf16 | fp16: weights (FP8 training keeps bf16 weights; TE casts per GEMM)."""
    norm_dtype: str | None = None
    """Dtype of norm weights; None: the parameter dtype (Transformer Engine). The local layer spec
    keeps them in fp32."""
    grad_dtype: str = "fp32"
    """Gradient buffer dtype (Megatron's grad_reduce_in_fp32 when fp32)."""
    optimizer: str = "adam"
    """adam (two fp32 moments) | sgd (one fp32 momentum)."""
    distributed_optimizer: bool = True
    """Shard optimizer state over the data-parallel group (Megatron's distributed optimizer)."""

    def __post_init__(self) -> None:
        for name in ("params_dtype", "grad_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(f"{name}={getattr(self, name)!r} (choose from {tuple(DTYPE_BYTES)})")
        if self.norm_dtype is not None and self.norm_dtype not in DTYPE_BYTES:
            raise ValueError(f"norm_dtype={self.norm_dtype!r} (choose from {tuple(DTYPE_BYTES)})")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer={self.optimizer!r} (choose adam or sgd)")

    def dtype_of(self, tensor: ParamTensor) -> str:
        return (self.norm_dtype or self.params_dtype) if tensor.is_norm else self.params_dtype

    def optimizer_bytes_per_element(self, dtype: str) -> int:
        moments = 8 if self.optimizer == "adam" else 4
        return moments + (0 if dtype == "fp32" else 4)


@dataclass(frozen=True)
class StateBytes:
    """What one rank holds for a trained model (bytes)."""

    params: int
    """Parameter elements on the rank (unpadded)."""
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def _pad(value: int, divisor: int) -> int:
    return int(math.ceil(value / divisor) * divisor)


def buffer_layout(tensors: list[ParamTensor], dp_size: int, distributed: bool
                  ) -> tuple[int, list[tuple[int, int]], list[tuple[ParamTensor, int, int, int]]]:
    """Megatron's layout of one buffer: (numel, buckets, [(tensor, start, end, bucket)])."""
    divisor = math.lcm(dp_size, 128)
    buckets: list[tuple[int, int]] = []
    placed: list[tuple[ParamTensor, int, int, int]] = []
    start = bucket_start = end = 0
    in_bucket = 0

    def close(end_index: int) -> int:
        nonlocal bucket_start, in_bucket
        bucket_end = _pad(end_index, divisor) if distributed else end_index
        buckets.append((bucket_start, bucket_end))
        bucket_start, in_bucket = bucket_end, 0
        return bucket_end

    for tensor in reversed(tensors):
        if distributed:
            start = _pad(start, 64)
        own_bucket = tensor.shared_embedding and distributed
        if own_bucket and in_bucket:
            start = close(start)
        end = start + tensor.numel
        placed.append((tensor, start, end, len(buckets)))
        in_bucket += 1
        if own_bucket:
            start = close(end)
        else:
            start = end
    if in_bucket:
        close(end)
    numel = buckets[-1][1] if buckets else 0
    return numel, buckets, placed


def _optimizer_elements(placed, buckets, dp_size: int, dp_rank: int) -> dict[int, int]:
    """Elements of each placed tensor (by index) inside ``dp_rank``'s shard of its bucket."""
    owned: dict[int, int] = {}
    for index, (_, start, end, bucket) in enumerate(placed):
        bucket_start, bucket_end = buckets[bucket]
        shard = (bucket_end - bucket_start) // dp_size
        lo = bucket_start + dp_rank * shard
        hi = min(bucket_end, lo + shard)
        owned[index] = max(0, min(end, hi) - max(start, lo))
    return owned


def _buffers(tensors: list[ParamTensor], precision: TrainingPrecision):
    """Dense then expert buffers, each keyed by parameter dtype in first-seen order."""
    groups: dict[tuple[bool, str], list[ParamTensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.is_expert, precision.dtype_of(tensor)), []).append(tensor)
    return groups


def trained_state_bytes(tensors: list[ParamTensor], precision: TrainingPrecision, dp_size: int,
                        expert_dp_size: int, dp_rank: int | None = None,
                        expert_dp_rank: int | None = None) -> StateBytes:
    """Weights, grads and optimizer bytes of a rank holding ``tensors`` under Megatron DDP.

    ``dp_size``: size of the dense DP x CP group; ``expert_dp_size``: of the expert-data-parallel
    group. ``dp_rank`` / ``expert_dp_rank``: the rank's position in those groups; None: the most
    loaded position (an upper bound when both are None).
    """
    distributed = precision.distributed_optimizer
    grad_bytes = DTYPE_BYTES[precision.grad_dtype]
    weights = grads = 0
    optimizer_by_group = {False: {}, True: {}}
    for (is_expert, dtype), members in _buffers(tensors, precision).items():
        size = expert_dp_size if is_expert else dp_size
        numel, buckets, placed = buffer_layout(members, size, distributed)
        weights += numel * DTYPE_BYTES[dtype]
        grads += numel * grad_bytes
        per_element = precision.optimizer_bytes_per_element(dtype)
        by_rank = optimizer_by_group[is_expert]
        for rank in range(size):
            if distributed:
                owned = sum(_optimizer_elements(placed, buckets, size, rank).values())
            else:
                owned = sum(tensor.numel for tensor in members)
            by_rank[rank] = by_rank.get(rank, 0) + owned * per_element
    optimizer = 0
    for is_expert, rank in ((False, dp_rank), (True, expert_dp_rank)):
        by_rank = optimizer_by_group[is_expert]
        if by_rank:
            optimizer += max(by_rank.values()) if rank is None else by_rank[rank]
    params = sum(tensor.numel for tensor in tensors)
    return StateBytes(params=params, weights=weights, grads=grads, optimizer=optimizer)


def frozen_weight_bytes(tensors: list[ParamTensor], precision: TrainingPrecision) -> int:
    """Bytes of a model that is not trained (reference, reward model): its weights, unpadded."""
    return sum(tensor.numel * DTYPE_BYTES[precision.dtype_of(tensor)] for tensor in tensors)
