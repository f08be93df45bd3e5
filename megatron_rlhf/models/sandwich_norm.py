"""Sandwich ("post-sublayer") norms for GLM-4-0414 style layers, as layer-spec modules.

GLM-4-0414 (HF ``Glm4ForCausalLM``) normalises the attention output and the MLP output once more
before each residual add: ``h = h + norm_a(attn(norm_in(h)))``, ``h = h + norm_m(mlp(norm_pre(h)))``.
Megatron-Core's ``TransformerLayer`` has no such slots, so instead of patching a built layer the
spec swaps in :class:`PostNormSelfAttention` and :class:`PostNormMLP`: the stock modules whose
output passes through their own RMSNorm (``post_layernorm``) before Megatron's bias-dropout-add.
This requires bias-free output projections (``add_bias_linear=False``), as GLM-4 has.

Works with the local and the Transformer Engine specs (the sublayer internals are untouched), with
or without sequence parallelism (the post norms are :class:`megatron_rlhf.models.local_norm.LocalNorm`).
"""

from __future__ import annotations

import copy
from typing import Any

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP


def _post_norm(config: Any) -> Any:
    from megatron_rlhf.models.local_norm import LocalNorm

    # the sublayer output is a sequence-parallel shard under SP: LocalNorm marks its weight
    return LocalNorm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)


def _normalise(module: Any, result: Any) -> Any:
    output, bias = result
    if bias is not None:
        raise ValueError("sandwich norms need bias-free output projections (add_bias_linear=False)")
    return module.post_layernorm(output), None


class PostNormSelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` followed by an RMSNorm of its output."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        self.post_layernorm = _post_norm(config)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _normalise(self, super().forward(*args, **kwargs))


class PostNormMLP(MLP):
    """Megatron ``MLP`` followed by an RMSNorm of its output."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        self.post_layernorm = _post_norm(config)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _normalise(self, super().forward(*args, **kwargs))


def with_sandwich_norms(layer_spec: Any) -> Any:
    """A copy of a dense GPT layer spec whose attention and MLP carry post-sublayer norms."""
    spec = copy.deepcopy(layer_spec)
    attention, mlp = spec.submodules.self_attention, spec.submodules.mlp
    if attention.module is not SelfAttention or mlp.module is not MLP:
        raise ValueError(
            f"sandwich norms need a dense SelfAttention/MLP layer spec, got "
            f"{attention.module.__name__}/{mlp.module.__name__}"
        )
    attention.module = PostNormSelfAttention
    mlp.module = PostNormMLP
    return spec
