"""GLM-4-0414 (HF ``Glm4ForCausalLM``) <-> Megatron: the glm layout plus two sandwich norms.

``post_self_attn_layernorm`` / ``post_mlp_layernorm`` normalise the attention / MLP outputs
before the residual adds; in Megatron they live in the spec-swapped sublayers
(:mod:`megatron_rlhf.models.sandwich_norm`) as ``self_attention.post_layernorm`` and
``mlp.post_layernorm``.
"""

from __future__ import annotations

from megatron_rlhf.mapping import glm
from megatron_rlhf.mapping.rules import WeightRule
from megatron_rlhf.models.arch import ArchSpec

FAMILY = "glm4"
global_rules = glm.global_rules


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    base, hf = "decoder.layers.{layer}", "model.layers.{layer}"
    return glm.layer_rules(arch, moe_layer) + [
        WeightRule(f"{base}.self_attention.post_layernorm.weight",
                   (f"{hf}.post_self_attn_layernorm.weight",)),
        WeightRule(f"{base}.mlp.post_layernorm.weight", (f"{hf}.post_mlp_layernorm.weight",)),
    ]
