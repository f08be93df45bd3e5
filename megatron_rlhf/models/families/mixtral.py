"""Mixtral (every layer MoE, top-k softmax routing renormalised over the chosen experts).

HF checkpoints name the MoE block ``block_sparse_moe`` with the router ``gate`` and experts
``experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down). Refused: ``sliding_window``.
"""

from __future__ import annotations

from megatron_rlhf.models.arch_spec import ArchSpec
from megatron_rlhf.models.families.family import (
    FamilyFeatures,
    HFConfig,
    ModelFamily,
    reject_sliding_window,
    require_field,
    routed_expert_features,
)
from megatron_rlhf.models.families.weight_rules import (
    WeightRule,
    attention_rules,
    embedding_rules,
    moe_mlp_rules,
)


def features(config: HFConfig, num_layers: int, where: str) -> FamilyFeatures:
    return routed_expert_features(
        config,
        num_experts=require_field(config, "num_local_experts", where),
        ffn_width=require_field(config, "intermediate_size", where),
        renormalise=True,
        layer_pattern=(1,) * num_layers,
        qk_layernorm=False,
        where=where,
    )


def global_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    return embedding_rules(arch, role)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    return attention_rules(arch) + moe_mlp_rules(
        router="block_sparse_moe.gate.weight",
        gate="block_sparse_moe.experts.{expert}.w1.weight",
        up="block_sparse_moe.experts.{expert}.w3.weight",
        down="block_sparse_moe.experts.{expert}.w2.weight",
    )


FAMILY = ModelFamily(
    name="mixtral",
    model_types=("mixtral",),
    hf_architecture="MixtralForCausalLM",
    hf_field_defaults={"num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                       "max_position_embeddings": 131072},
    check_features=reject_sliding_window,
    features=features,
    global_rules=global_rules,
    layer_rules=layer_rules,
    tiny_config={"head_dim": 32, "tie_word_embeddings": False, "num_local_experts": 4,
                 "num_experts_per_tok": 2},
)
