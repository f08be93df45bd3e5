"""Llama (Llama-2/3 style: GQA, untied LM head, SwiGLU with separate gate/up) <-> Megatron."""

from __future__ import annotations

from megatron_rlhf.mapping.rules import WeightRule, attention_rules, dense_mlp_rules, embedding_rules
from megatron_rlhf.models.arch import ArchSpec

FAMILY = "llama"


def global_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    return embedding_rules(arch, role)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    return attention_rules(arch) + dense_mlp_rules()
