"""Qwen3-MoE (QK norm, top-k routed SwiGLU experts, optional dense layers) <-> Megatron.

HF checkpoints store one tensor per expert (``mlp.experts.{e}.gate_proj`` ...) and the router as
``mlp.gate``; Megatron's local spec holds ``mlp.router`` and ``mlp.experts.local_experts.{j}``,
where local expert ``j`` on expert-parallel rank ``r`` is global expert ``r * E / EP + j``.
Layers listed in ``mlp_only_layers`` (or skipped by ``decoder_sparse_step``) are dense.
"""

from __future__ import annotations

from megatron_rlhf.mapping.rules import (
    WeightRule,
    attention_rules,
    dense_mlp_rules,
    embedding_rules,
    moe_mlp_rules,
)
from megatron_rlhf.models.arch import ArchSpec

FAMILY = "qwen3_moe"


def global_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    return embedding_rules(arch, role)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    if not moe_layer:
        return attention_rules(arch) + dense_mlp_rules()
    return attention_rules(arch) + moe_mlp_rules(
        router="mlp.gate.weight",
        gate="mlp.experts.{expert}.gate_proj.weight",
        up="mlp.experts.{expert}.up_proj.weight",
        down="mlp.experts.{expert}.down_proj.weight",
    )
