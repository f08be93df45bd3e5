"""Qwen3 dense (per-head RMSNorm on queries and keys, no QKV bias) <-> Megatron.

HF's ``self_attn.q_norm`` / ``k_norm`` map to Megatron's ``q_layernorm`` / ``k_layernorm``
(both normalise each head's ``head_dim`` vector before rotary embeddings).
"""

from __future__ import annotations

from megatron_rlhf.mapping.rules import WeightRule, attention_rules, dense_mlp_rules, embedding_rules
from megatron_rlhf.models.arch import ArchSpec

FAMILY = "qwen3"


def global_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    return embedding_rules(arch, role)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    return attention_rules(arch) + dense_mlp_rules()
