"""Pure checks of the weight rules and the rule registry (no processes, no Megatron model)."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.mapping.registry import expand_rules
from megatron_rlhf.mapping.rules import pad_vocab, shard, to_hf, to_megatron, unshard
from megatron_rlhf.models.arch import arch_spec_from_hf_config
from megatron_rlhf.models.families.registry import FAMILIES
from megatron_rlhf.models.families.weight_rules import WeightRule
from megatron_rlhf.models.layer_spec import (
    TransformerEngineUnavailable,
    canonical_name,
    implementation_name,
    resolve_transformer_impl,
    transformer_engine_installed,
)


def _config(model_type: str, **extra) -> dict:
    base = dict(
        model_type=model_type,
        num_hidden_layers=3,
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=100,
    )
    base.update(extra)
    return base


def test_qkv_fusion_is_interleaved_per_group_and_invertible():
    arch = arch_spec_from_hf_config(_config("llama"))
    rule = WeightRule("w", ("q", "k", "v"), combine="qkv", split="column")
    q = torch.arange(8 * 16 * 4, dtype=torch.float32).reshape(128, 4)
    k = -torch.arange(2 * 16 * 4, dtype=torch.float32).reshape(32, 4) - 1
    v = torch.arange(2 * 16 * 4, dtype=torch.float32).reshape(32, 4) + 10_000
    fused = to_megatron(rule, [q, k, v], arch)
    # Group 0 holds query heads 0..3, then key head 0, then value head 0.
    assert torch.equal(fused[:64], q[:64])
    assert torch.equal(fused[64:80], k[:16])
    assert torch.equal(fused[80:96], v[:16])
    assert torch.equal(fused[96:160], q[64:])
    for original, restored in zip([q, k, v], to_hf(rule, fused, arch)):
        assert torch.equal(original, restored)


def test_qkv_bias_round_trip():
    arch = arch_spec_from_hf_config(_config("qwen2"))
    rule = WeightRule("b", ("q", "k", "v"), combine="qkv", split="column")
    tensors = [torch.randn(128), torch.randn(32), torch.randn(32)]
    for original, restored in zip(tensors, to_hf(rule, to_megatron(rule, tensors, arch), arch)):
        assert torch.equal(original, restored)


@pytest.mark.parametrize("split", ["replicated", "column", "row", "glu"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_unshard_is_identity(split, tp):
    rule = WeightRule("w", ("x",), split=split)
    full = torch.randn(16, 8)
    parts = [shard(rule, full, rank, tp) for rank in range(tp)]
    assert torch.equal(unshard(rule, parts), full)


def test_glu_shard_takes_matching_gate_and_up_rows():
    rule = WeightRule("w", ("gate", "up"), combine="glu", split="glu")
    gate, up = torch.zeros(4, 2), torch.ones(4, 2)
    full = to_megatron(WeightRule("w", ("gate", "up"), combine="glu"), [gate, up], None)
    part = shard(rule, full, rank=1, size=2)
    assert torch.equal(part, torch.cat([gate[2:], up[2:]]))


def test_pad_vocab_appends_zero_rows_only():
    tensor = torch.randn(5, 3)
    padded = pad_vocab(tensor, 8)
    assert torch.equal(padded[:5], tensor) and torch.equal(padded[5:], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="more than padded"):
        pad_vocab(tensor, 4)


@pytest.mark.parametrize("family", sorted(family.name for family in FAMILIES))
def test_every_hf_tensor_is_mapped_exactly_once(family):
    extra = {}
    if family == "qwen3_moe":
        extra = dict(num_experts=4, moe_intermediate_size=32, num_experts_per_tok=2, mlp_only_layers=[1])
    if family == "mixtral":
        extra = dict(num_local_experts=4, num_experts_per_tok=2)
    if family == "glm":
        extra = dict(attention_bias=True, partial_rotary_factor=0.5)
    arch = arch_spec_from_hf_config(_config(family, **extra))
    placed = expand_rules(arch, "lm")
    exported = [name for p in placed if not p.rule.import_only for name in p.rule.hf]
    assert len(exported) == len(set(exported))
    megatron_names = [p.rule.megatron for p in placed]
    assert len(megatron_names) == len(set(megatron_names))
    if family == "qwen3_moe":  # layer 1 is dense (mlp_only_layers)
        assert "decoder.layers.1.mlp.linear_fc1.weight" in megatron_names
        assert "decoder.layers.0.mlp.router.weight" in megatron_names


def test_tied_model_exports_no_lm_head_but_fills_the_output_layer():
    arch = arch_spec_from_hf_config(_config("qwen2", tie_word_embeddings=True))
    placed = {p.rule.megatron: p.rule for p in expand_rules(arch, "lm")}
    assert placed["output_layer.weight"].import_only
    assert placed["output_layer.weight"].hf == ("model.embed_tokens.weight",)


def test_scalar_roles_map_final_norm_into_the_head():
    arch = arch_spec_from_hf_config(_config("llama"))
    placed = {p.rule.megatron: p.rule for p in expand_rules(arch, "reward")}
    assert placed["head.final_layernorm.weight"].hf == ("model.norm.weight",)
    assert placed["head.score.weight"].optional
    assert "output_layer.weight" not in placed


@pytest.mark.parametrize(
    "local,is_moe",
    [
        ("decoder.layers.3.input_layernorm.weight", False),
        ("decoder.layers.3.pre_mlp_layernorm.weight", False),
        ("decoder.layers.3.pre_mlp_layernorm.weight", True),
        ("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight", True),
        ("decoder.layers.3.self_attention.linear_qkv.weight", False),
    ],
)
def test_transformer_engine_names_round_trip(local, is_moe):
    te_name = implementation_name(local, "transformer_engine", is_moe)
    assert canonical_name(te_name, "transformer_engine") == local
    assert implementation_name(local, "local", is_moe) == local


def test_transformer_engine_fused_norm_names():
    assert implementation_name("decoder.layers.0.input_layernorm.weight", "transformer_engine", False) == (
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    )
    assert implementation_name("decoder.layers.0.pre_mlp_layernorm.weight", "transformer_engine", False) == (
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    )


def test_transformer_engine_request_fails_clearly_when_unusable():
    if transformer_engine_installed() and torch.cuda.is_available():
        assert resolve_transformer_impl("transformer_engine") == "transformer_engine"
        return
    with pytest.raises(TransformerEngineUnavailable, match="transformer_impl='transformer_engine'"):
        resolve_transformer_impl("transformer_engine")
    assert resolve_transformer_impl("auto") == "local"
    with pytest.raises(ValueError, match="transformer_impl='fast'"):
        resolve_transformer_impl("fast")
