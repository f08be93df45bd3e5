"""Llama (Llama-2/3 style: GQA, untied or tied LM head, SwiGLU with separate gate/up).

The reference layout the other families are read against: every HF tensor maps one to one onto
Megatron's local spec except the fused QKV and gate/up projections. Refused: ``sliding_window``
and ``attention_bias`` (HF then also biases ``o_proj``, which Megatron's GPT layer lacks).
"""

from __future__ import annotations

from megatron_rlhf.models.arch_spec import ArchSpec, UnsupportedArchitecture
from megatron_rlhf.models.families.family import (
    FamilyFeatures,
    HFConfig,
    ModelFamily,
    reject_sliding_window,
)
from megatron_rlhf.models.families.weight_rules import (
    WeightRule,
    attention_rules,
    dense_mlp_rules,
    embedding_rules,
)


def check_features(config: HFConfig, where: str) -> None:
    reject_sliding_window(config, where)
    if config.get("attention_bias"):
        raise UnsupportedArchitecture(
            f"{where}: attention_bias=true for llama also biases o_proj, which Megatron's "
            "GPT layer cannot represent"
        )


def features(config: HFConfig, num_layers: int, where: str) -> FamilyFeatures:
    return FamilyFeatures()


def global_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    return embedding_rules(arch, role)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    return attention_rules(arch) + dense_mlp_rules()


FAMILY = ModelFamily(
    name="llama",
    model_types=("llama",),
    hf_architecture="LlamaForCausalLM",
    hf_field_defaults={"max_position_embeddings": 2048},
    check_features=check_features,
    features=features,
    global_rules=global_rules,
    layer_rules=layer_rules,
    tiny_config={"head_dim": 32, "tie_word_embeddings": False, "attention_bias": False,
                 "mlp_bias": False},
)
