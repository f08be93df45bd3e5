"""GLM-4 in HF's ``GlmForCausalLM`` layout (the policy family of "Does RLHF Scale?").

Differences from Llama, all expressed in the ArchSpec or here: QKV bias (``attention_bias``,
true by default), rotary embeddings on the first half of each head's dims with interleaved pairs
(Megatron: ``rotary_percent=0.5``, ``rotary_interleaved=True``), and a gate/up projection that HF
already stores fused as ``mlp.gate_up_proj`` (``[gate; up]``, the same order Megatron's
``linear_fc1`` uses).
"""

from __future__ import annotations

from typing import Any

from megatron_rlhf.models.arch_spec import ArchSpec
from megatron_rlhf.models.families.family import (
    FamilyFeatures,
    HFConfig,
    ModelFamily,
    no_family_checks,
)
from megatron_rlhf.models.families.weight_rules import (
    WeightRule,
    attention_rules,
    dense_mlp_rules,
    embedding_rules,
)

HF_FIELD_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 2,
    "head_dim": 128,
    "rms_norm_eps": 1.5625e-07,
    "attention_bias": True,
    "partial_rotary_factor": 0.5,
    "max_position_embeddings": 131072,
}
"""transformers' GlmConfig defaults (Glm4Config shares them)."""

TINY_CONFIG: dict[str, Any] = {
    "head_dim": 32, "tie_word_embeddings": False, "attention_bias": True,
    "partial_rotary_factor": 0.5,
}


def features(config: HFConfig, num_layers: int, where: str) -> FamilyFeatures:
    return FamilyFeatures(qkv_bias=bool(config.get("attention_bias")), rotary_interleaved=True)


def global_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    return embedding_rules(arch, role)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    return attention_rules(arch) + dense_mlp_rules(fused_gate_up=True)


FAMILY = ModelFamily(
    name="glm",
    model_types=("glm",),
    hf_architecture="GlmForCausalLM",
    hf_field_defaults=HF_FIELD_DEFAULTS,
    check_features=no_family_checks,
    features=features,
    global_rules=global_rules,
    layer_rules=layer_rules,
    tiny_config=TINY_CONFIG,
)
