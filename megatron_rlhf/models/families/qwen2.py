"""Qwen2 / Qwen2.5 (QKV bias, usually tied embeddings).

Same tensor layout as Llama: the differences are properties of the ArchSpec, not of the names.
``ArchSpec.qkv_bias`` is always true for this family, so the fused QKV bias rule (same per-group
layout as the weight) is included; with ``tie_word_embeddings`` no ``lm_head.weight`` is exported
and the last pipeline stage's output layer is filled from ``model.embed_tokens.weight``.
"""

from __future__ import annotations

from megatron_rlhf.models.families import llama
from megatron_rlhf.models.families.family import (
    FamilyFeatures,
    HFConfig,
    ModelFamily,
    no_family_checks,
)


def features(config: HFConfig, num_layers: int, where: str) -> FamilyFeatures:
    return FamilyFeatures(qkv_bias=True)


FAMILY = ModelFamily(
    name="qwen2",
    model_types=("qwen2",),
    hf_architecture="Qwen2ForCausalLM",
    hf_field_defaults={"num_key_value_heads": 32, "max_position_embeddings": 32768},
    check_features=no_family_checks,
    features=features,
    global_rules=llama.global_rules,
    layer_rules=llama.layer_rules,
    # Qwen2Config has no head_dim field: it derives 128 / 4 = 32.
    tiny_config={"tie_word_embeddings": True},
)
