"""The parallel layout the planner checks, and its validation against a model.

:class:`PlanLayout` names every size of a Megatron layout explicitly (TP, PP, CP, DP, EP, ETP,
sequence parallelism, optional uneven first/last pipeline stages). :func:`validate_layout` checks
it against an :class:`~megatron_rlhf.models.arch.ArchSpec` before any memory question is asked:

- world = TP x PP x CP x DP, and for MoE models also = ETP x EP x PP x EDP (EDP a whole number);
- attention heads and KV heads divisible by TP, MLP width by TP, expert width by ETP;
- experts divisible by EP (EP > 1 only for MoE models);
- layers divisible by PP, or explicit first/last stage layer counts that leave an equal share for
  every middle stage;
- sequence length divisible by 2 x CP x TP when CP > 1 (Megatron's load-balanced CP split);
  by TP when sequence parallelism is on;
- sequence parallelism only with TP > 1.

Every failure is a :class:`LayoutError` (a ``ValueError``) naming the sizes involved. Pure: no
torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rlhf.config.errors import ConfigError
from megatron_rlhf.models.arch import ArchSpec


class LayoutError(ConfigError):
    """A layout that cannot split this model over this many GPUs."""


@dataclass(frozen=True)
class PlanLayout:
    """Sizes of one Megatron layout (every field >= 1 unless stated)."""

    tensor_parallel: int = 1
    """TP: ranks that split each weight matrix."""
    pipeline_parallel: int = 1
    """PP: pipeline stages."""
    context_parallel: int = 1
    """CP: ranks that split the sequence inside attention."""
    data_parallel: int = 1
    """DP: model replicas (the distributed optimizer shards over DP x CP)."""
    expert_parallel: int = 1
    """EP: ranks that split the experts of MoE layers."""
    expert_tensor_parallel: int | None = None
    """ETP: TP inside each expert; None means equal to TP (Megatron's default)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism in the TP regions (needs TP > 1)."""
    first_stage_layers: int | None = None
    """Layers on the first pipeline stage when stages are uneven; None: an equal share."""
    last_stage_layers: int | None = None
    """Layers on the last pipeline stage when stages are uneven; None: an equal share."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel", "data_parallel",
                     "expert_parallel"):
            _positive(name, getattr(self, name))
        for name in ("expert_tensor_parallel", "first_stage_layers", "last_stage_layers"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))

    @property
    def etp(self) -> int:
        """ETP with the default applied."""
        return self.tensor_parallel if self.expert_tensor_parallel is None else self.expert_tensor_parallel

    @property
    def world_size(self) -> int:
        """GPUs of one model: TP x PP x CP x DP."""
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel * self.data_parallel

    @property
    def expert_data_parallel(self) -> int:
        """EDP: replicas of each expert shard, world / (ETP x EP x PP)."""
        return self.world_size // (self.etp * self.expert_parallel * self.pipeline_parallel)

    @property
    def optimizer_shards(self) -> int:
        """Ranks over which the distributed optimizer shards dense parameters: DP x CP."""
        return self.data_parallel * self.context_parallel

    def describe(self) -> str:
        parts = [f"TP{self.tensor_parallel}", f"PP{self.pipeline_parallel}", f"CP{self.context_parallel}",
                 f"DP{self.data_parallel}", f"EP{self.expert_parallel}", f"ETP{self.etp}"]
        return "x".join(parts) + (" SP" if self.sequence_parallel else "")


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LayoutError(f"{name} must be a positive integer, got {value!r}")


def stage_layer_counts(num_layers: int, layout: PlanLayout) -> list[int]:
    """Layers of each pipeline stage (validated: see :func:`validate_layout`)."""
    pp = layout.pipeline_parallel
    first, last = layout.first_stage_layers, layout.last_stage_layers
    if first is None and last is None:
        if num_layers % pp:
            raise LayoutError(
                f"pipeline_parallel={pp} does not divide num_layers={num_layers}; give "
                "first/last stage layer counts for uneven stages"
            )
        return [num_layers // pp] * pp
    if pp == 1:
        raise LayoutError("first/last stage layer counts need pipeline_parallel > 1")
    first = num_layers // pp if first is None else first
    last = num_layers // pp if last is None else last
    middle_stages = pp - 2
    rest = num_layers - first - (last if pp > 1 else 0)
    if rest < 0 or (middle_stages == 0 and rest != 0) or (middle_stages and rest % middle_stages):
        raise LayoutError(
            f"first_stage_layers={first} and last_stage_layers={last} leave {rest} layers that do "
            f"not split equally over {middle_stages} middle stages (num_layers={num_layers}, "
            f"pipeline_parallel={pp})"
        )
    middle = rest // middle_stages if middle_stages else 0
    counts = [first] + [middle] * middle_stages + [last]
    if min(counts) < 1:
        raise LayoutError(f"a pipeline stage would hold no layers: {counts}")
    return counts


def validate_layout(arch: ArchSpec, layout: PlanLayout, seq_len: int | None = None) -> list[int]:
    """Check ``layout`` against ``arch`` (module doc); return the layers of each stage."""
    tp, cp, ep, etp = layout.tensor_parallel, layout.context_parallel, layout.expert_parallel, layout.etp
    for name, value in (("num_attention_heads", arch.num_attention_heads),
                        ("num_key_value_heads", arch.num_query_groups),
                        ("intermediate_size", arch.ffn_hidden_size)):
        if value % tp:
            raise LayoutError(f"tensor_parallel={tp} does not divide {name}={value}")
    if layout.sequence_parallel and tp == 1:
        raise LayoutError("sequence_parallel needs tensor_parallel > 1")
    if arch.is_moe:
        assert arch.num_experts is not None and arch.moe_ffn_hidden_size is not None
        if arch.num_experts % ep:
            raise LayoutError(f"expert_parallel={ep} does not divide num_experts={arch.num_experts}")
        if arch.moe_ffn_hidden_size % etp:
            raise LayoutError(
                f"expert_tensor_parallel={etp} does not divide moe_intermediate_size={arch.moe_ffn_hidden_size}"
            )
        expert_ranks = etp * ep * layout.pipeline_parallel
        if layout.world_size % expert_ranks:
            raise LayoutError(
                f"world size TPxPPxCPxDP = {layout.world_size} is not a multiple of ETPxEPxPP = "
                f"{etp}x{ep}x{layout.pipeline_parallel} (the expert layout must tile the same GPUs)"
            )
    elif ep > 1 or layout.expert_tensor_parallel not in (None, tp):
        raise LayoutError(f"expert_parallel={ep} / expert_tensor_parallel={layout.etp} but the model has no experts")
    if seq_len is not None:
        if cp > 1 and seq_len % (2 * cp * tp):
            raise LayoutError(
                f"seq_len={seq_len} is not divisible by 2 x CP x TP = {2 * cp * tp} (context parallel)"
            )
        if layout.sequence_parallel and seq_len % tp:
            raise LayoutError(f"seq_len={seq_len} is not divisible by TP={tp} (sequence parallel)")
    if layout.pipeline_parallel > arch.num_layers:
        raise LayoutError(
            f"pipeline_parallel={layout.pipeline_parallel} exceeds num_layers={arch.num_layers}"
        )
    return stage_layer_counts(arch.num_layers, layout)
