"""Qwen3-MoE (QK norm, top-k routed SwiGLU experts, optional dense layers).

HF checkpoints store one tensor per expert (``mlp.experts.{e}.gate_proj`` ...) and the router as
``mlp.gate``; Megatron's local spec holds ``mlp.router`` and ``mlp.experts.local_experts.{j}``,
where local expert ``j`` on expert-parallel rank ``r`` is global expert ``r * E / EP + j``.
Layers listed in ``mlp_only_layers`` (or skipped by ``decoder_sparse_step``) are dense. Routing
renormalises over the chosen experts only with ``norm_topk_prob``. Refused: ``attention_bias``
and shared experts.
"""

from __future__ import annotations

from megatron_rlhf.models.arch_spec import ArchSpec, UnsupportedArchitecture
from megatron_rlhf.models.families import qwen3
from megatron_rlhf.models.families.family import (
    FamilyFeatures,
    HFConfig,
    ModelFamily,
    require_field,
    routed_expert_features,
)
from megatron_rlhf.models.families.weight_rules import (
    WeightRule,
    attention_rules,
    dense_mlp_rules,
    embedding_rules,
    moe_mlp_rules,
)


def check_features(config: HFConfig, where: str) -> None:
    qwen3.check_features(config, where)
    if config.get("shared_expert_intermediate_size"):
        raise UnsupportedArchitecture(f"{where}: shared experts are not supported")


def features(config: HFConfig, num_layers: int, where: str) -> FamilyFeatures:
    # transformers >= 5 writes num_local_experts; older Hub configs say num_experts.
    experts = config.get("num_experts") or require_field(config, "num_local_experts", where)
    step = int(config.get("decoder_sparse_step", 1))
    if step < 1:
        raise UnsupportedArchitecture(f"{where}: decoder_sparse_step={step} must be >= 1")
    dense_layers = set(config.get("mlp_only_layers") or [])
    pattern = tuple(
        0 if (layer in dense_layers or (layer + 1) % step != 0) else 1
        for layer in range(num_layers)
    )
    return routed_expert_features(
        config,
        num_experts=experts,
        ffn_width=require_field(config, "moe_intermediate_size", where),
        renormalise=bool(config.get("norm_topk_prob", False)),
        layer_pattern=pattern,
        qk_layernorm=True,
        where=where,
    )


def global_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    return embedding_rules(arch, role)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    if not moe_layer:
        return attention_rules(arch) + dense_mlp_rules()
    return attention_rules(arch) + moe_mlp_rules(
        router="mlp.gate.weight",
        gate="mlp.experts.{expert}.gate_proj.weight",
        up="mlp.experts.{expert}.up_proj.weight",
        down="mlp.experts.{expert}.down_proj.weight",
    )


FAMILY = ModelFamily(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    hf_architecture="Qwen3MoeForCausalLM",
    hf_field_defaults={"num_key_value_heads": 4, "max_position_embeddings": 32768},
    check_features=check_features,
    features=features,
    global_rules=global_rules,
    layer_rules=layer_rules,
    # Qwen3MoeConfig has no head_dim field: it derives 128 / 4 = 32.
    tiny_config={"tie_word_embeddings": False, "num_experts": 4, "num_experts_per_tok": 2,
                 "moe_intermediate_size": 64, "norm_topk_prob": True, "decoder_sparse_step": 1,
                 "mlp_only_layers": []},
)
