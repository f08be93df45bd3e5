"""On CPU with real gloo ranks, the planner's bytes equal what Megatron actually holds.

For TP2, PP2 (tied embeddings split over stages), DP2 and EP2 (MoE, experts sharded, expert
optimizer over the expert-data-parallel group) layouts of tiny models, every rank builds its real
Megatron-Core stage model, wraps it in Megatron DDP with the distributed optimizer
(:class:`~megatron_rlhf.training.megatron_step.MegatronUpdater`, fp32: CPU has no bf16 mixed
precision optimizer) and takes two optimizer steps. Then, per rank:

- weights = bytes of the DDP buffers' ``param_data`` (every parameter is a view into them),
- grads = bytes of the buffers' ``grad_data``,
- optimizer = bytes of the Adam moments (and fp32 master copies, absent in fp32) held in the
  optimizer state, distinct storages, ``step`` scalars excluded,

each equal, exactly, to :func:`megatron_rlhf.planning.state_bytes.trained_state_bytes` for that
rank's pipeline stage and DP / expert-DP position.

Activations, measured honestly: ``torch.autograd.graph.saved_tensors_hooks`` wrap the whole
training step (Megatron's 1F1B schedule included); every tensor saved for backward that is not a
parameter is counted once per storage while some graph still holds it (a finaliser on the packed
handle releases it), and the peak of that live total is the measured activation memory (with
the loss's own saved tensors). It must be within 25% of the planner's activations plus logits
for the stage (the planner's 1F1B in-flight count included).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 500
SEQ = 64
MICRO = 2
MICROBATCHES = 4
LAYOUTS = {
    "llama-TP2": ("llama", ParallelConfig(tensor_parallel=2), 2),
    "qwen2-PP2-tied": ("qwen2", ParallelConfig(pipeline_parallel=2), 2),
    "llama-DP2": ("llama", ParallelConfig(), 2),
    "qwen3_moe-EP2": ("qwen3_moe", ParallelConfig(expert_parallel=2), 2),
}


class _LiveSaved:
    """Bytes of saved-for-backward storages currently held by some autograd graph."""

    def __init__(self, parameter_storages: set[int]):
        self.parameters = parameter_storages
        self.refs: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor):
        key = tensor.untyped_storage().data_ptr()
        if key in self.parameters or tensor.device.type == "meta":
            return tensor
        if key not in self.refs:
            self.refs[key] = 0
            self.live += tensor.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Handle(self, key, tensor.untyped_storage().nbytes(), tensor)

    def release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes


class _Handle:
    def __init__(self, owner: _LiveSaved, key: int, nbytes: int, tensor: torch.Tensor):
        self.owner, self.key, self.nbytes, self.tensor = owner, key, nbytes, tensor

    def __del__(self):
        self.owner.release(self.key, self.nbytes)


def _unpack(handle):
    return handle.tensor if isinstance(handle, _Handle) else handle


def _lm_loss(logits, microbatch):
    from megatron_rlhf.training.lm_loss import next_token_loss

    return next_token_loss(logits, microbatch, VOCAB)


def _held_bytes(updater) -> tuple[int, int, int]:
    ddp = updater.model
    buffers = ddp.buffers + ddp.expert_parallel_buffers
    weights = sum(buffer.param_data.nbytes for buffer in buffers)
    grads = sum(buffer.grad_data.nbytes for buffer in buffers)
    buffer_storages = {buffer.param_data.untyped_storage().data_ptr() for buffer in buffers}
    for parameter in ddp.module.parameters():
        assert parameter.untyped_storage().data_ptr() in buffer_storages
    optimizers = getattr(updater.optimizer, "chained_optimizers", [updater.optimizer])
    seen: set[int] = set()
    optimizer = 0
    for chained in optimizers:
        for state in chained.optimizer.state.values():
            for name, value in state.items():
                if name == "step" or not isinstance(value, torch.Tensor):
                    continue
                key = value.untyped_storage().data_ptr()
                if key not in seen and key not in buffer_storages:
                    seen.add(key)
                    optimizer += value.untyped_storage().nbytes()
        for group in getattr(chained, "shard_fp32_from_float16_groups", []):
            for master in group:
                key = master.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    optimizer += master.untyped_storage().nbytes()
    return weights, grads, optimizer


def _worker(family: str, parallel: ParallelConfig, tokens: torch.Tensor):
    from megatron.core import parallel_state

    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model
    from megatron_rlhf.models.tiny import tiny_hf_config
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.training.megatron_step import MegatronUpdater, OptimizerSettings

    state = initialize_parallel(parallel, seed=1)
    arch = arch_spec_from_hf_config(tiny_hf_config(family, vocab_size=VOCAB).to_dict())
    model = build_stage_model(arch, parallel, ModelBuildConfig(transformer_impl="local"))
    updater = MegatronUpdater(model, OptimizerSettings(lr=1e-3))
    local = tokens.chunk(state.data_parallel_size)[state.data_parallel_rank]
    microbatches = [{"input_ids": part} for part in local.split(MICRO)]
    updater.step(microbatches, _lm_loss)
    parameters = {p.untyped_storage().data_ptr() for p in updater.model.parameters()}
    live = _LiveSaved(parameters)
    with torch.autograd.graph.saved_tensors_hooks(live.pack, _unpack):
        updater.step(microbatches, _lm_loss)
    weights, grads, optimizer = _held_bytes(updater)
    return {
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(with_context_parallel=True),
        "expert_dp_rank": parallel_state.get_expert_data_parallel_rank(),
        "dp_size": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        "expert_dp_size": parallel_state.get_expert_data_parallel_world_size(),
        "microbatches": len(microbatches),
        "held": (weights, grads, optimizer),
        "activation_peak": live.peak,
    }


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planner_bytes_equal_megatron_held_bytes(name, rank_pool):
    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.models.tiny import tiny_hf_config
    from megatron_rlhf.planning.activations import stage_activation_bytes
    from megatron_rlhf.planning.layout import PlanLayout, stage_layer_counts
    from megatron_rlhf.planning.params import stage_parameters
    from megatron_rlhf.planning.activations import logits_bytes
    from megatron_rlhf.planning.params import padded_vocab
    from megatron_rlhf.planning.state_bytes import TrainingPrecision, trained_state_bytes

    family, parallel, world = LAYOUTS[name]
    arch = arch_spec_from_hf_config(tiny_hf_config(family, vocab_size=VOCAB).to_dict())
    tokens = torch.randint(0, VOCAB, (MICRO * MICROBATCHES * world // parallel.model_parallel, SEQ),
                           generator=torch.Generator().manual_seed(0))
    reports = rank_pool.run(_worker, world, family, parallel, tokens)
    layout = PlanLayout(tensor_parallel=parallel.tensor_parallel, pipeline_parallel=parallel.pipeline_parallel,
                        expert_parallel=parallel.expert_parallel,
                        data_parallel=parallel.data_parallel(world))
    precision = TrainingPrecision(params_dtype="fp32", norm_dtype="fp32")
    counts = stage_layer_counts(arch.num_layers, layout)
    for rank, report in enumerate(reports):
        stage = report["stage"]
        planned = trained_state_bytes(stage_parameters(arch, layout, stage), precision,
                                      report["dp_size"], report["expert_dp_size"],
                                      report["dp_rank"], report["expert_dp_rank"])
        assert report["held"] == (planned.weights, planned.grads, planned.optimizer), (name, rank)
        layers = range(sum(counts[:stage]), sum(counts[:stage + 1]))
        planned_activations = stage_activation_bytes(arch, layout, stage, layers, MICRO * SEQ, 4,
                                                     report["microbatches"])
        if stage == layout.pipeline_parallel - 1:
            planned_activations += logits_bytes(arch, layout, MICRO * SEQ, 4, entropy=False,
                                                padded_vocab_size=padded_vocab(VOCAB, layout.tensor_parallel))
        measured = report["activation_peak"]
        print(f"{name} rank {rank} stage {stage}: activations planned {planned_activations} "
              f"measured peak {measured} ratio {planned_activations / measured:.3f}")
        assert abs(planned_activations - measured) <= 0.25 * measured, (name, rank, planned_activations, measured)
