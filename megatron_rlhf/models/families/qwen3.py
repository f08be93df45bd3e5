"""Qwen3 dense (per-head RMSNorm on queries and keys, no QKV bias).

Same tensor layout as Llama plus the QK norms, which the shared attention rules add when
``ArchSpec.qk_layernorm`` is set: HF's ``self_attn.q_norm`` / ``k_norm`` map to Megatron's
``q_layernorm`` / ``k_layernorm`` (both normalise each head's ``head_dim`` vector before rotary).
Refused: ``attention_bias``.
"""

from __future__ import annotations

from megatron_rlhf.models.arch_spec import UnsupportedArchitecture
from megatron_rlhf.models.families import llama
from megatron_rlhf.models.families.family import FamilyFeatures, HFConfig, ModelFamily


def check_features(config: HFConfig, where: str) -> None:
    if config.get("attention_bias"):
        raise UnsupportedArchitecture(f"{where}: attention_bias=true is not supported for qwen3")


def features(config: HFConfig, num_layers: int, where: str) -> FamilyFeatures:
    return FamilyFeatures(qk_layernorm=True)


FAMILY = ModelFamily(
    name="qwen3",
    model_types=("qwen3",),
    hf_architecture="Qwen3ForCausalLM",
    hf_field_defaults={"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768},
    check_features=check_features,
    features=features,
    global_rules=llama.global_rules,
    layer_rules=llama.layer_rules,
    tiny_config={"head_dim": 32, "tie_word_embeddings": True, "attention_bias": False},
)
