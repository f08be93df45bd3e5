"""Mixtral (every layer MoE, top-k softmax routing renormalised over the chosen experts).

HF checkpoints name the MoE block ``block_sparse_moe`` with the router ``gate`` and experts
``experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down).
"""

from __future__ import annotations

from megatron_rlhf.mapping.rules import WeightRule, attention_rules, embedding_rules, moe_mlp_rules
from megatron_rlhf.models.arch import ArchSpec

FAMILY = "mixtral"


def global_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    return embedding_rules(arch, role)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    return attention_rules(arch) + moe_mlp_rules(
        router="block_sparse_moe.gate.weight",
        gate="block_sparse_moe.experts.{expert}.w1.weight",
        up="block_sparse_moe.experts.{expert}.w3.weight",
        down="block_sparse_moe.experts.{expert}.w2.weight",
    )
