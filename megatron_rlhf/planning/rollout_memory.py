"""vLLM's memory per GPU during rollouts: weights in the engine's TP layout and the KV cache.

The engine shards every projection over its own TP size; KV heads are replicated when the
engine's TP exceeds the model's KV heads (each GPU keeps at least one KV head), which is what
makes the KV cache per token stop shrinking past that TP. Pure arithmetic: no torch import.
"""

from __future__ import annotations

from megatron_rlhf.models.arch import ArchSpec


def engine_kv_heads(arch: ArchSpec, engine_tp: int) -> int:
    """KV heads each engine GPU keeps (replicated when engine TP > KV heads)."""
    if engine_tp <= arch.num_query_groups:
        if arch.num_query_groups % engine_tp:
            raise ValueError(
                f"engine tensor parallel {engine_tp} does not divide num_key_value_heads="
                f"{arch.num_query_groups}"
            )
        return arch.num_query_groups // engine_tp
    if engine_tp % arch.num_query_groups:
        raise ValueError(
            f"engine tensor parallel {engine_tp} is not a multiple of num_key_value_heads="
            f"{arch.num_query_groups} (vLLM replicates KV heads only evenly)"
        )
    return 1


def kv_cache_bytes_per_token(arch: ArchSpec, engine_tp: int = 1, kv_bytes: int = 2) -> int:
    """K and V of one token on one engine GPU, over all layers."""
    return 2 * arch.num_layers * engine_kv_heads(arch, engine_tp) * arch.head_dim * kv_bytes


def engine_weight_elements(arch: ArchSpec, engine_tp: int = 1) -> int:
    """Weight elements on one engine GPU (vocabulary unpadded; norms replicated)."""
    h, d = arch.hidden_size, arch.head_dim
    nq = arch.num_attention_heads
    kv = engine_kv_heads(arch, engine_tp)
    qkv_rows = nq * d // engine_tp + 2 * kv * d
    per_layer_attention = qkv_rows * h + (qkv_rows if arch.qkv_bias else 0) + nq * d // engine_tp * h
    norms = 2 * h + (2 * d if arch.qk_layernorm else 0) + (2 * h if arch.post_sublayer_norms else 0)
    total = 0
    for layer in range(arch.num_layers):
        moe = arch.is_moe and arch.moe_layer_pattern is not None and arch.moe_layer_pattern[layer]
        if moe:
            assert arch.num_experts is not None and arch.moe_ffn_hidden_size is not None
            mlp = arch.num_experts * h + arch.num_experts * 3 * arch.moe_ffn_hidden_size * h // engine_tp
        else:
            mlp = 3 * arch.ffn_hidden_size * h // engine_tp
        total += per_layer_attention + norms + mlp
    vocab = -(-arch.vocab_size // engine_tp) * h
    total += vocab + h + (0 if arch.tie_word_embeddings else vocab)
    return total
