"""Qwen2 / Qwen2.5 (QKV bias, usually tied embeddings) <-> Megatron.

The QKV bias is fused in the same per-group layout as the weight; ``ArchSpec.qkv_bias`` is
always true for this family.
"""

from __future__ import annotations

from megatron_rlhf.mapping.rules import WeightRule, attention_rules, dense_mlp_rules, embedding_rules
from megatron_rlhf.models.arch import ArchSpec

FAMILY = "qwen2"


def global_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    return embedding_rules(arch, role)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    return attention_rules(arch) + dense_mlp_rules()
