"""GPU memory the planner plans against.

``total_bytes`` is the device memory the CUDA driver reports (``nvidia-smi``'s "Total" for the
SXM parts: H100 80GB HBM3 81559 MiB, H200 143771 MiB). ``reserve_bytes`` is held back for the
CUDA context, NCCL buffers and allocator fragmentation; usable = total - reserve.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2
DEFAULT_RESERVE_GIB = 5.0


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model's memory."""

    name: str
    total_bytes: int
    """Device memory as reported by the driver."""
    reserve_bytes: int = int(DEFAULT_RESERVE_GIB * GIB)
    """Kept free for the CUDA context, NCCL and fragmentation."""

    @property
    def usable_bytes(self) -> int:
        return self.total_bytes - self.reserve_bytes


GPUS = {
    "h100": GpuSpec("H100-80GB", 81559 * MIB),
    "h200": GpuSpec("H200-141GB", 143771 * MIB),
}


def gpu_spec(name: str | None, memory_gib: float | None = None,
             reserve_gib: float = DEFAULT_RESERVE_GIB) -> GpuSpec:
    """The named GPU, or one of ``memory_gib`` GiB; ``reserve_gib`` held back either way."""
    if reserve_gib < 0:
        raise ValueError(f"reserve_gib={reserve_gib} must be >= 0")
    if memory_gib is not None:
        if memory_gib <= reserve_gib:
            raise ValueError(f"GPU memory {memory_gib} GiB must exceed the reserve {reserve_gib} GiB")
        return GpuSpec(name or f"{memory_gib:g}GiB", int(memory_gib * GIB), int(reserve_gib * GIB))
    if name not in GPUS:
        raise ValueError(f"gpu={name!r} (choose from {sorted(GPUS)} or give the memory in GiB)")
    return GpuSpec(GPUS[name].name, GPUS[name].total_bytes, int(reserve_gib * GIB))
