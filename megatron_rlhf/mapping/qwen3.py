"""Qwen3 dense (per-head RMSNorm on queries and keys, no QKV bias) <-> Megatron.

Same tensor layout as Llama plus the QK norms, which the shared attention rules add when
``ArchSpec.qk_layernorm`` is set: HF's ``self_attn.q_norm`` / ``k_norm`` map to Megatron's
``q_layernorm`` / ``k_layernorm`` (both normalise each head's ``head_dim`` vector before rotary).
"""

from __future__ import annotations

from megatron_rlhf.mapping.llama import global_rules, layer_rules

FAMILY = "qwen3"

__all__ = ["FAMILY", "global_rules", "layer_rules"]
