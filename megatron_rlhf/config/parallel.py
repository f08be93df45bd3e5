"""Parallel layout: how a model is split across processes.

The data-parallel size is not configured: it is what is left of the world size once tensor,
pipeline and context parallelism are taken out. Expert parallelism is carved out of the data
(and context) parallel ranks, as in Megatron-Core.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rlhf.config.errors import UserError


class ParallelLayoutError(UserError):
    """A parallel layout that cannot work for this world size or model."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1
    """TP: ranks that split every weight matrix. Must divide the attention heads, the KV heads
    and the padded vocabulary. >= 1."""

    pipeline_parallel: int = 1
    """PP: ranks that split the layers into consecutive stages of equal size; must divide the
    number of layers. >= 1."""

    context_parallel: int = 1
    """CP: ranks that split the sequence dimension of attention. >= 1."""

    expert_parallel: int = 1
    """EP: ranks that split the experts of MoE layers. Must divide the expert count and
    data_parallel * context_parallel. >= 1."""

    expert_tensor_parallel: int | None = None
    """ETP: TP size inside each expert. None means equal to tensor_parallel (Megatron's default)."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism in TP regions (needs tensor_parallel > 1)."""

    def __post_init__(self) -> None:
        for name in (
            "tensor_parallel",
            "pipeline_parallel",
            "context_parallel",
            "expert_parallel",
        ):
            _check_positive(name, getattr(self, name))
        if self.expert_tensor_parallel is not None:
            _check_positive("expert_tensor_parallel", self.expert_tensor_parallel)
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ParallelLayoutError("sequence_parallel=True needs tensor_parallel > 1")

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one full model replica: TP x PP x CP."""
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    @property
    def expert_tensor_parallel_size(self) -> int:
        """ETP with the default applied."""
        if self.expert_tensor_parallel is None:
            return self.tensor_parallel
        return self.expert_tensor_parallel

    def data_parallel(self, world_size: int) -> int:
        """DP size for ``world_size`` processes; raises if the layout does not fit."""
        if world_size % self.model_parallel != 0:
            raise ParallelLayoutError(
                f"world size {world_size} is not divisible by TP*PP*CP = "
                f"{self.tensor_parallel}*{self.pipeline_parallel}*{self.context_parallel}"
            )
        data_parallel = world_size // self.model_parallel
        expert_ranks = self.expert_parallel * self.expert_tensor_parallel_size
        dense_ranks = self.tensor_parallel * data_parallel * self.context_parallel
        if dense_ranks % expert_ranks != 0:
            raise ParallelLayoutError(
                f"expert_parallel={self.expert_parallel} x expert_tensor_parallel="
                f"{self.expert_tensor_parallel_size} does not divide TP*DP*CP = {dense_ranks} "
                f"(world size {world_size})"
            )
        return data_parallel

    @property
    def minimal_world_size(self) -> int:
        """Fewest processes that run this layout: TP*PP*CP per replica and, because expert
        parallelism is carved out of data parallelism, one replica per EP rank."""
        return self.model_parallel * self.expert_parallel

    def world_size(self, data_parallel: int = 1) -> int:
        """Processes needed for this layout with ``data_parallel`` replicas."""
        _check_positive("data_parallel", data_parallel)
        return self.model_parallel * data_parallel

    def describe(self) -> str:
        parts = [f"TP{self.tensor_parallel}", f"PP{self.pipeline_parallel}"]
        if self.context_parallel > 1:
            parts.append(f"CP{self.context_parallel}")
        if self.expert_parallel > 1:
            parts.append(f"EP{self.expert_parallel}")
        return "x".join(parts)


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ParallelLayoutError(f"{name} must be a positive integer, got {value!r}")
