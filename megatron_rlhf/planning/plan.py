"""The fit plan: bytes per GPU and per phase of an RLHF (or SFT/RM) job, and the peak.

:func:`compute_plan` takes a model (:class:`~megatron_rlhf.models.arch.ArchSpec`), a validated
:class:`~megatron_rlhf.planning.layout.PlanLayout` and a :class:`PlanRequest`, and returns a
:class:`Plan` with, for every pipeline stage (the GPUs of one stage hold the same bytes), the bytes
of each component in each phase:

- ``rollout``: trained models' state (minus what is offloaded), frozen models, vLLM weights and
  the KV cache of the rollout batch (colocated engines; disaggregated engines run on their own
  GPUs and are planned as such);
- ``weight_sync``: the same minus the KV cache (the engine sleeps its cache), plus two buckets
  (the gathered bucket on the trainer and the engine's receiving copy);
- ``logprob_forward``: state, one layer's transient activations and one microbatch's fp32 logits;
- ``train_fwd_bwd``: state, the saved activations of the in-flight microbatches and the logits;
- ``optimizer_step``: state plus an fp32 temporary the size of the rank's optimizer shard.

The peak is the largest phase total over stages; it fits when it is at most the GPU's usable
memory. Host memory per node adds what is offloaded, the sleeping engine's weights and the
weight-sync staging buckets. Pure arithmetic: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rlhf.models.arch import ArchSpec
from megatron_rlhf.planning.activations import (
    RECOMPUTE,
    forward_only_bytes,
    logits_bytes,
    stage_activation_bytes,
)
from megatron_rlhf.planning.hardware import GpuSpec, gpu_spec
from megatron_rlhf.planning.layout import PlanLayout, validate_layout
from megatron_rlhf.planning.params import padded_vocab, stage_parameters
from megatron_rlhf.planning.rollout_memory import engine_weight_elements, kv_cache_bytes_per_token
from megatron_rlhf.planning.state_bytes import (
    DTYPE_BYTES,
    StateBytes,
    TrainingPrecision,
    frozen_weight_bytes,
    trained_state_bytes,
)

PHASES = ("rollout", "weight_sync", "logprob_forward", "train_fwd_bwd", "optimizer_step")
COMPONENTS = ("weights", "grads", "optimizer", "frozen_models", "activations", "logits",
              "engine_weights", "kv_cache", "sync_buckets", "temporaries")
OFFLOAD = ("none", "optimizer", "all")


@dataclass(frozen=True)
class RolloutSettings:
    """The vLLM engine colocated with the trainer (absent for SFT / reward-model training)."""

    engine_tensor_parallel: int = 1
    """vLLM's own TP size."""
    sequences_per_engine: int = 64
    """Sequences one engine holds in its KV cache at once (prompts x n / engines, or vLLM's
    max_num_seqs when smaller)."""
    max_sequence_tokens: int = 4096
    """Prompt plus response tokens of the longest sequence."""
    weight_bytes: int = 2
    """Bytes per engine weight element: 2 (bf16), 1 (fp8 rollouts)."""
    kv_bytes: int = 2
    """Bytes per KV-cache element: 2 (bf16), 1 (fp8 cache)."""
    colocated: bool = True
    """The engine shares the trainer's GPUs (False: it has its own GPUs, planned as the
    ``engine`` row: its weights, the KV cache and one receiving sync bucket)."""
    memory_fraction: float = 1.0
    """Share of an engine GPU's memory vLLM may take (``gpu_memory_utilization``); an engine on
    its own GPUs must fit in it."""


@dataclass(frozen=True)
class PlanRequest:
    """What the job does on each GPU."""

    seq_len: int = 4096
    """Tokens per training sequence (prompt + response)."""
    micro_batch: int = 1
    """Sequences per microbatch."""
    microbatches: int | None = None
    """Microbatches per step per DP rank; None: enough to fill the pipeline (PP)."""
    recompute: str = "none"
    """none | selective | full activation recompute."""
    precision: TrainingPrecision = field(default_factory=TrainingPrecision)
    activation_bytes: int = 2
    """Bytes per activation element (2 for bf16/fp8 training, 4 for fp32)."""
    role: str = "lm"
    """lm (actor, SFT, GenRM) | value | reward | prm: the trained model's head."""
    entropy: bool = True
    """The loss also computes the token entropy (one more fp32 vocabulary copy)."""
    trained_models: int = 1
    """Trained models colocated on each GPU with this layout (2: actor and PPO critic; 0: a
    group of frozen models only, e.g. a reference group on GPUs of its own)."""
    frozen_models: int = 0
    """Frozen copies colocated on each GPU (1: the reference model)."""
    rollout: RolloutSettings | None = None
    """The colocated engine; None for SFT / reward-model training."""
    sync_bucket_bytes: int = 64 * 1024**2
    """Bytes per weight-sync bucket."""
    offload: str = "none"
    """none | optimizer (grads + optimizer to host outside training) | all (weights too)."""
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r} (choose from {RECOMPUTE})")
        if self.offload not in OFFLOAD:
            raise ValueError(f"offload={self.offload!r} (choose from {OFFLOAD})")
        for name in ("seq_len", "micro_batch", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.trained_models < 0 or self.frozen_models < 0 or self.trained_models + self.frozen_models < 1:
            raise ValueError("a plan needs at least one trained or frozen model")


@dataclass(frozen=True)
class StagePlan:
    """Bytes on each GPU of one pipeline stage."""

    stage: int
    params: int
    state: StateBytes
    phases: dict[str, dict[str, int]]
    """phase -> component -> bytes."""
    host_bytes: int
    """Host memory this GPU's process needs for offloaded state and the sleeping engine."""
    engine_sequences: int = 0
    """Engine rows: full-length sequences whose KV cache the GPU holds at once."""

    def phase_total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak(self) -> tuple[str, int]:
        phase = max(self.phases, key=self.phase_total)
        return phase, self.phase_total(phase)


@dataclass(frozen=True)
class Plan:
    layout: PlanLayout
    gpu: GpuSpec
    stages: list[StagePlan]
    kv_bytes_per_token: int
    host_bytes_per_node: int
    engine: StagePlan | None = None
    """GPUs of a disaggregated engine (stage -1), or None."""
    engine_budget_bytes: int | None = None
    """What vLLM may take on an engine GPU (its memory fraction of the total, at most usable)."""
    has_rollout: bool = False
    """The job generates with a vLLM engine (colocated or on GPUs of its own)."""

    @property
    def params_per_gpu(self) -> int:
        return max(stage.params for stage in self.stages)

    @property
    def state_bytes_per_gpu(self) -> int:
        return max(stage.state.total for stage in self.stages)

    def _rows(self) -> list[StagePlan]:
        return self.stages + ([self.engine] if self.engine is not None else [])

    @property
    def peak(self) -> tuple[int, str, int]:
        """(stage, phase, bytes) of the most loaded GPU (stage -1: an engine GPU)."""
        best = max(self._rows(), key=lambda stage: stage.peak[1])
        return best.stage, *best.peak

    def _over(self) -> list[tuple[StagePlan, int]]:
        over = [(stage, self.gpu.usable_bytes) for stage in self.stages
                if stage.peak[1] > self.gpu.usable_bytes]
        if self.engine is not None:
            budget = self.engine_budget_bytes or self.gpu.usable_bytes
            if self.engine.peak[1] > budget:
                over.append((self.engine, budget))
        return over

    @property
    def fits(self) -> bool:
        return not self._over()

    def overflow(self) -> str:
        """What overflows: the first GPU row over its budget, its peak phase and largest component."""
        over = self._over()
        stage, budget = over[0] if over else (max(self._rows(), key=lambda row: row.peak[1]), self.gpu.usable_bytes)
        phase, total = stage.peak
        components = stage.phases[phase]
        largest = max(components, key=components.get)
        gib = 1024**3
        where = "an engine GPU" if stage.stage < 0 else f"pipeline stage {stage.stage}"
        return (f"phase {phase} on {where} needs {total / gib:.2f} GiB > usable "
                f"{budget / gib:.2f} GiB of {self.gpu.name}; largest component: "
                f"{largest} {components[largest] / gib:.2f} GiB")


def _stage_plan(arch: ArchSpec, layout: PlanLayout, request: PlanRequest, stage: int,
                layers: range) -> StagePlan:
    tensors = stage_parameters(arch, layout, stage, request.role)
    precision = request.precision
    state = trained_state_bytes(tensors, precision, layout.optimizer_shards, layout.expert_data_parallel)
    frozen = request.frozen_models * frozen_weight_bytes(tensors, precision)
    models = request.trained_models
    if models == 0:  # a group of frozen models: their weights are all it holds
        state = StateBytes(params=state.params, weights=frozen, grads=0, optimizer=0)
    weights, grads, optimizer = models * state.weights, models * state.grads, models * state.optimizer
    tokens = request.micro_batch * request.seq_len // layout.context_parallel
    act = request.activation_bytes
    microbatches = request.microbatches or layout.pipeline_parallel
    last = stage == layout.pipeline_parallel - 1
    logits = 0
    if last and request.role == "lm":
        vocab = padded_vocab(arch.vocab_size, layout.tensor_parallel)
        logits = logits_bytes(arch, layout, tokens, act, request.entropy, vocab)
    activations = stage_activation_bytes(arch, layout, stage, layers, tokens, act, microbatches,
                                         request.recompute)
    offloaded = {"none": 0, "optimizer": grads + optimizer, "all": grads + optimizer + weights + frozen}
    away = offloaded[request.offload]
    resident = {"weights": weights, "grads": grads, "optimizer": optimizer, "frozen_models": frozen}
    if request.offload in ("optimizer", "all"):
        outside = {**resident, "grads": 0, "optimizer": 0}
        if request.offload == "all":
            outside.update(weights=0, frozen_models=0)
    else:
        outside = dict(resident)
    engine_weights = kv = 0
    rollout = request.rollout
    if rollout is not None and rollout.colocated:
        engine_weights = engine_weight_elements(arch, rollout.engine_tensor_parallel) * rollout.weight_bytes
        kv = (kv_cache_bytes_per_token(arch, rollout.engine_tensor_parallel, rollout.kv_bytes)
              * rollout.sequences_per_engine * rollout.max_sequence_tokens)
    buckets = 2 * request.sync_bucket_bytes if rollout is not None else 0
    # weight sync needs the trainer's weights on the GPU even when they were offloaded
    sync_state = {**outside, "weights": weights}
    phases = {
        "rollout": {**outside, "engine_weights": engine_weights, "kv_cache": kv},
        "weight_sync": {**sync_state, "engine_weights": engine_weights, "sync_buckets": buckets},
        "logprob_forward": {**outside, "frozen_models": frozen, "weights": weights,
                            "activations": forward_only_bytes(arch, layout, layers, tokens, act),
                            "logits": logits},
        "train_fwd_bwd": {**resident, "activations": activations, "logits": logits},
        "optimizer_step": {**resident, "temporaries": optimizer // precision.optimizer_bytes_per_element(precision.params_dtype) * 4},
    }
    if rollout is None:
        for phase in ("rollout", "weight_sync"):
            phases.pop(phase)
    if models == 0:  # frozen models only: they run forward passes and nothing else
        phases = {"logprob_forward": phases["logprob_forward"]}
    for components in phases.values():
        for name in COMPONENTS:
            components.setdefault(name, 0)
    sleeping_engine = engine_weights if rollout is not None and rollout.colocated else 0
    return StagePlan(stage, state.params, state, phases, away + sleeping_engine)


def compute_plan(arch: ArchSpec, layout: PlanLayout, request: PlanRequest,
                 gpu: GpuSpec | None = None) -> Plan:
    """Validate ``layout`` for ``arch`` and compute the bytes per GPU (module doc).

    Raises :class:`~megatron_rlhf.planning.layout.LayoutError` for an invalid layout.
    """
    counts = validate_layout(arch, layout, request.seq_len)
    if request.rollout is not None:
        kv_per_token = kv_cache_bytes_per_token(arch, request.rollout.engine_tensor_parallel,
                                                request.rollout.kv_bytes)
    else:
        kv_per_token = kv_cache_bytes_per_token(arch, 1, 2)
    stages = []
    start = 0
    for stage, count in enumerate(counts):
        stages.append(_stage_plan(arch, layout, request, stage, range(start, start + count)))
        start += count
    staging = request.sync_bucket_bytes * 2 if request.rollout is not None else 0
    host = request.gpus_per_node * max(stage.host_bytes for stage in stages) + staging
    gpu = gpu or gpu_spec("h100")
    engine = budget = None
    rollout = request.rollout
    if rollout is not None and not rollout.colocated:
        budget = min(gpu.usable_bytes, int(rollout.memory_fraction * gpu.total_bytes))
        engine = _engine_plan(arch, rollout, request.sync_bucket_bytes, budget)
    return Plan(layout, gpu, stages, kv_per_token, host, engine, budget, rollout is not None)


def engine_concurrency(arch: ArchSpec, rollout: RolloutSettings, budget: int) -> int:
    """Full-length sequences whose KV cache fits on an engine GPU next to its weights."""
    weights = engine_weight_elements(arch, rollout.engine_tensor_parallel) * rollout.weight_bytes
    per_sequence = (kv_cache_bytes_per_token(arch, rollout.engine_tensor_parallel, rollout.kv_bytes)
                    * rollout.max_sequence_tokens)
    return max(0, (budget - weights) // per_sequence)


def _engine_plan(arch: ArchSpec, rollout: RolloutSettings, bucket_bytes: int, budget: int) -> StagePlan:
    """An engine GPU of its own: weights and the KV cache of its share of the batch, or of as
    many full-length sequences as its memory share holds (at least one: vLLM queues the rest,
    which costs time, not memory); during a sync, weights and one bucket."""
    weights = engine_weight_elements(arch, rollout.engine_tensor_parallel) * rollout.weight_bytes
    per_sequence = (kv_cache_bytes_per_token(arch, rollout.engine_tensor_parallel, rollout.kv_bytes)
                    * rollout.max_sequence_tokens)
    held = min(rollout.sequences_per_engine, max(1, engine_concurrency(arch, rollout, budget)))
    phases = {"rollout": {"engine_weights": weights, "kv_cache": held * per_sequence},
              "weight_sync": {"engine_weights": weights, "sync_buckets": bucket_bytes}}
    for components in phases.values():
        for name in COMPONENTS:
            components.setdefault(name, 0)
    return StagePlan(-1, 0, StateBytes(0, 0, 0, 0), phases, 0, held)


def activation_dtype_bytes(params_dtype: str) -> int:
    """Activation element size for a parameter dtype (fp8 training keeps bf16 activations)."""
    return DTYPE_BYTES.get(params_dtype, 2)
