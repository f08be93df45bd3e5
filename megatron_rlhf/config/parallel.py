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
    """PP: ranks that split the layers into consecutive stages, of equal size unless the first/
    last stage sizes are set below (then the rest must split evenly). >= 1."""

    context_parallel: int = 1
    """CP: ranks that split the sequence dimension (2*CP chunks, load-balanced; see
    :mod:`megatron_rlhf.models.context_parallel`). Needs CUDA and Transformer Engine attention. >= 1."""

    expert_parallel: int = 1
    """EP: ranks that split the experts of MoE layers. Must divide the expert count and
    data_parallel * context_parallel. >= 1."""

    expert_tensor_parallel: int | None = None
    """ETP: TP size inside each expert. None means equal to tensor_parallel (Megatron's default)."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism in TP regions (needs tensor_parallel > 1): activations outside
    them are split along the sequence over the TP ranks. Runs with the local spec (CPU included)
    and with Transformer Engine; Megatron-Core requires it for MoE with tensor_parallel > 1."""

    num_layers_in_first_pipeline_stage: int | None = None
    """Layers on the first pipeline stage when it should differ from the others (e.g. fewer, as
    it also holds the embedding); None: an even split. The layers left after the first and last
    stages are split evenly over the middle stages (Megatron-Core's uneven pipeline)."""

    num_layers_in_last_pipeline_stage: int | None = None
    """Layers on the last pipeline stage (which also holds the output layer and loss); None: even."""

    recompute_granularity: str | None = None
    """Activation recomputation: None (keep activations), "selective" (recompute the modules in
    recompute_modules, by default the attention core) or "full" (recompute whole layers)."""

    recompute_method: str | None = None
    """With "full": "uniform" (recompute every group of recompute_num_layers layers) or "block"
    (recompute the first recompute_num_layers layers of each stage). None for "selective"."""

    recompute_num_layers: int | None = None
    """With "full": layers per recompute group ("uniform") or recomputed layers per stage ("block")."""

    recompute_modules: tuple[str, ...] = ("core_attn",)
    """With "selective": the Megatron-Core submodules recomputed (core_attn, mlp, layernorm, ...)."""

    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with the backward pass (Megatron DDP buckets)."""

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
        self._check_recompute()
        for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
                if self.pipeline_parallel == 1:
                    raise ParallelLayoutError(f"{name} needs pipeline_parallel > 1")

    def _check_recompute(self) -> None:
        granularity, method, layers = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity not in (None, "selective", "full"):
            raise ParallelLayoutError(f"recompute_granularity={granularity!r} (choose None, 'selective' or 'full')")
        if granularity == "full":
            if method not in ("uniform", "block") or layers is None:
                raise ParallelLayoutError(
                    "recompute_granularity='full' needs recompute_method ('uniform' or 'block') and "
                    f"recompute_num_layers (got {method!r} and {layers!r})"
                )
            _check_positive("recompute_num_layers", layers)
        elif method is not None or layers is not None:
            raise ParallelLayoutError(
                f"recompute_method={method!r} / recompute_num_layers={layers!r} apply only to "
                f"recompute_granularity='full' (got {granularity!r})"
            )

    def stage_layers(self, num_layers: int) -> list[int]:
        """Layers on each pipeline stage (first and last as configured, the rest even)."""
        pp = self.pipeline_parallel
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if pp == 1:
            return [num_layers]
        fixed = [first, last]
        middle_stages = pp - sum(value is not None for value in fixed)
        rest = num_layers - sum(value or 0 for value in fixed)
        if rest < 0 or (middle_stages and rest % middle_stages) or (not middle_stages and rest):
            raise ParallelLayoutError(
                f"{num_layers} layers do not split over pipeline_parallel={pp} with "
                f"num_layers_in_first_pipeline_stage={first} and num_layers_in_last_pipeline_stage={last}: "
                f"the {rest} remaining layers must split evenly over the other {middle_stages} stages"
            )
        even = rest // middle_stages if middle_stages else 0
        return [first if first is not None else even] + [even] * (pp - 2) + [last if last is not None else even]

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
