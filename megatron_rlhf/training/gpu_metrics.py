"""GPU metrics of a rank: peak memory per phase, utilisation, and the MFU of each update.

- :func:`forward_flops` / :func:`training_flops`: model FLOPs from the architecture (pure): per
  token, the QKV / output projections, the gated MLP (or the routed experts' top-k MLPs and the
  router), the LM head, plus causal attention's ``QK^T`` and ``AV`` (``2 * q_width`` FLOPs per
  query-key pair, ``L(L+1)/2`` pairs in a sequence of ``L`` tokens). A multiply-add is 2 FLOPs;
  training is 3x the forward (backward = 2x). Norms, rotary and softmax are left out, as in the
  usual MFU convention.
- :class:`GpuPhaseMonitor`: on a rank with a CUDA device, each ``phase(name)`` records torch's
  peak allocated/reserved memory inside it, and (with nvidia-ml-py) the device's used memory
  and utilisation at its end; :meth:`GpuPhaseMonitor.record_update` adds the MFU of an update
  against the detected GPU's peak dense bf16/fp32 FLOP/s.

Guarantee: without a CUDA device (or for a GPU whose peak is not in :data:`PEAK_TFLOPS`, for
MFU) the metrics are absent, never estimated or faked. nvidia-ml-py is optional: without it the
nvml metrics are absent and the torch ones remain.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

GIB = 1024**3
# Dense (no sparsity) peak tensor-core TFLOP/s by GPU name fragment: (bf16, fp32 via tf32).
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "B200": (2250.0, 1100.0),
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),
    "H800": (989.0, 494.0),
    "A100": (312.0, 156.0),
    "A800": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10G": (70.0, 35.0),
}


def forward_flops_per_sequence(arch: Any, length: int, role: str = "lm") -> float:
    """Forward FLOPs of one sequence of ``length`` tokens through ``arch`` (see module doc)."""
    hidden, q_width = arch.hidden_size, arch.num_attention_heads * arch.head_dim
    kv_width = arch.num_query_groups * arch.head_dim
    attention_proj = 2 * hidden * (q_width + 2 * kv_width) + 2 * q_width * hidden
    dense_mlp = 2 * 3 * hidden * arch.ffn_hidden_size
    moe_layers = 0
    moe_mlp = 0.0
    if arch.num_experts:
        pattern = arch.moe_layer_pattern or (1,) * arch.num_layers
        moe_layers = sum(1 for flag in pattern if flag)
        moe_mlp = arch.moe_router_topk * 2 * 3 * hidden * arch.moe_ffn_hidden_size + 2 * hidden * arch.num_experts
    per_token = arch.num_layers * attention_proj + (arch.num_layers - moe_layers) * dense_mlp + moe_layers * moe_mlp
    per_token += 2 * hidden * (arch.vocab_size if role == "lm" else 1)
    attention_pairs = length * (length + 1) / 2
    return float(per_token * length + arch.num_layers * 2 * 2 * q_width * attention_pairs)


def training_flops(arch: Any, lengths: Sequence[int], role: str = "lm", passes: int = 1) -> float:
    """Forward + backward FLOPs of ``passes`` passes over sequences of ``lengths`` tokens."""
    return 3.0 * passes * sum(forward_flops_per_sequence(arch, int(length), role) for length in lengths)


def peak_flops(device_name: str, dtype_name: str) -> float | None:
    """Peak dense FLOP/s of a GPU called ``device_name`` in bfloat16 or float32; None if unknown."""
    for fragment, (bf16, fp32) in PEAK_TFLOPS.items():
        if fragment in device_name:
            return (fp32 if dtype_name == "float32" else bf16) * 1e12
    return None


def _nvml_handle(index: int) -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        import torch

        pynvml.nvmlInit()
        uuid = torch.cuda.get_device_properties(index).uuid  # the device Ray made visible as `index`
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except Exception:  # noqa: BLE001 - nvml missing or device not found: its metrics stay absent
        return None


class GpuPhaseMonitor:
    """Per-phase GPU metrics of this rank (no-op without CUDA; see the module docstring)."""

    def __init__(self, rank: int):
        import torch

        self.rank = rank
        self.enabled = torch.cuda.is_available()
        self.metrics: dict[str, float] = {}
        self.device = torch.cuda.current_device() if self.enabled else None
        self.name = torch.cuda.get_device_name(self.device) if self.enabled else ""
        self.nvml = _nvml_handle(self.device) if self.enabled else None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        prefix = f"gpu/{name}/rank{self.rank}"
        self.metrics[f"{prefix}/peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
        self.metrics[f"{prefix}/peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / GIB
        if self.nvml is not None:
            import pynvml

            self.metrics[f"{prefix}/nvml_used_gib"] = pynvml.nvmlDeviceGetMemoryInfo(self.nvml).used / GIB
            self.metrics[f"{prefix}/utilization_pct"] = float(pynvml.nvmlDeviceGetUtilizationRates(self.nvml).gpu)

    @contextmanager
    def update(self, name: str, flops_per_gpu: float, dtype_name: str) -> Iterator[None]:
        """A timed :meth:`phase` that also records the MFU of ``flops_per_gpu`` FLOPs."""
        if not self.enabled:
            yield
            return
        import torch

        with self.phase(name):
            torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            yield
            torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
        peak = peak_flops(self.name, dtype_name)
        if peak is not None and seconds > 0:
            self.metrics[f"gpu/{name}/rank{self.rank}/mfu"] = flops_per_gpu / seconds / peak
            self.metrics[f"gpu/{name}/rank{self.rank}/tflops_per_gpu"] = flops_per_gpu / seconds / 1e12

    def pop(self) -> dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics
