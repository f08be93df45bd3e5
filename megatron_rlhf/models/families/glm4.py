"""GLM-4-0414 (HF ``Glm4ForCausalLM``): the glm layout plus two sandwich norms.

``post_self_attn_layernorm`` / ``post_mlp_layernorm`` normalise the attention / MLP outputs
before the residual adds; in Megatron they live in the spec-swapped sublayers
(:mod:`megatron_rlhf.models.sandwich_norm`) as ``self_attention.post_layernorm`` and
``mlp.post_layernorm``. Defaults, checks and tiny config are glm's.
"""

from __future__ import annotations

from dataclasses import replace

from megatron_rlhf.models.arch_spec import ArchSpec
from megatron_rlhf.models.families import glm
from megatron_rlhf.models.families.family import (
    FamilyFeatures,
    HFConfig,
    ModelFamily,
    no_family_checks,
)
from megatron_rlhf.models.families.weight_rules import WeightRule


def features(config: HFConfig, num_layers: int, where: str) -> FamilyFeatures:
    return replace(glm.features(config, num_layers, where), post_sublayer_norms=True)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    base, hf = "decoder.layers.{layer}", "model.layers.{layer}"
    return glm.layer_rules(arch, moe_layer) + [
        WeightRule(f"{base}.self_attention.post_layernorm.weight",
                   (f"{hf}.post_self_attn_layernorm.weight",)),
        WeightRule(f"{base}.mlp.post_layernorm.weight", (f"{hf}.post_mlp_layernorm.weight",)),
    ]


FAMILY = ModelFamily(
    name="glm4",
    model_types=("glm4",),
    hf_architecture="Glm4ForCausalLM",
    hf_field_defaults=glm.HF_FIELD_DEFAULTS,
    check_features=no_family_checks,
    features=features,
    global_rules=glm.global_rules,
    layer_rules=layer_rules,
    tiny_config=glm.TINY_CONFIG,
)
