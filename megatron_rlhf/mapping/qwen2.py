"""Qwen2 / Qwen2.5 (QKV bias, usually tied embeddings) <-> Megatron.

Same tensor layout as Llama: the differences are properties of the ArchSpec, not of the names.
``ArchSpec.qkv_bias`` is always true for this family, so the fused QKV bias rule (same per-group
layout as the weight) is included; with ``tie_word_embeddings`` no ``lm_head.weight`` is exported
and the last pipeline stage's output layer is filled from ``model.embed_tokens.weight``.
"""

from __future__ import annotations

from megatron_rlhf.mapping.llama import global_rules, layer_rules

FAMILY = "qwen2"

__all__ = ["FAMILY", "global_rules", "layer_rules"]
