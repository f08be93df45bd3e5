"""The architecture record every model family produces, and the error for what it cannot hold.

A light value-type module (no torch, no package imports) so that the generic config parser
(:mod:`megatron_rlhf.models.arch`), the family modules (:mod:`megatron_rlhf.models.families`), the
model provider and the weight mappings can all share :class:`ArchSpec` without import cycles.
:mod:`megatron_rlhf.models.arch` re-exports both names, which is where most callers import them.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rlhf.config.errors import UserError


class UnsupportedArchitecture(UserError):
    """The HF config describes a model this package cannot reproduce exactly."""


@dataclass(frozen=True)
class ArchSpec:
    """A decoder-only transformer in the terms Megatron-Core needs."""

    family: str
    """Name of its :class:`~megatron_rlhf.models.families.family.ModelFamily` (llama, glm4, ...)."""
    model_type: str
    """HF ``model_type``."""
    hf_architecture: str
    """HF class name, e.g. ``LlamaForCausalLM``."""
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """KV heads (GQA groups); equals num_attention_heads for MHA."""
    head_dim: int
    ffn_hidden_size: int
    """Dense MLP width (intermediate_size)."""
    vocab_size: int
    """Vocabulary rows in the HF embedding (before Megatron's padding)."""
    max_position_embeddings: int
    norm_epsilon: float
    rope_theta: float
    rotary_percent: float = 1.0
    """Fraction of each head's dims that get rotary embeddings (GLM: 0.5)."""
    rotary_interleaved: bool = False
    """Rotary pairs are (0,1), (2,3), ... (GLM) instead of the two halves (Llama)."""
    rope_scaling_factor: float | None = None
    """Llama-3 style frequency scaling factor; None when not scaled."""
    qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int | None = None
    moe_router_pre_softmax: bool = False
    """True: softmax over all experts, then top-k without renormalising (norm_topk_prob=False)."""
    moe_layer_pattern: tuple[int, ...] | None = None
    """Per layer: 1 = MoE layer, 0 = dense MLP layer. None for dense models."""
    post_sublayer_norms: bool = False
    """Extra RMSNorm on the attention and MLP outputs before the residual add (GLM-4-0414)."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups
