"""Layer specs: Transformer Engine when installed and asked for, Megatron-Core "local" otherwise.

The choice is made by :class:`ModelBuildConfig.transformer_impl` (``auto`` | ``local`` |
``transformer_engine``). ``auto`` picks Transformer Engine only where it is importable and CUDA
is present; asking for ``transformer_engine`` where it is not installed fails at config
validation with :class:`TransformerEngineUnavailable`, never deep inside a kernel.

Parameter naming differs between the two: TE fuses the input layernorm into
``self_attention.linear_qkv`` and the pre-MLP layernorm into ``mlp.linear_fc1`` (dense layers),
and names grouped-GEMM expert weights ``experts.linear_fc1.weight<j>``. :func:`canonical_name`
maps a TE name to the local-spec name used by ``megatron_rlhf.mapping``; :func:`implementation_name`
is its inverse.

Core attention of the local spec is chosen by :class:`ModelBuildConfig.local_attention`
(``sdpa`` | ``megatron``): ``sdpa`` (the default) swaps Megatron's unfused ``DotProductAttention``
for :class:`megatron_rlhf.models.sdpa_attention.SDPACoreAttention` (fused
``scaled_dot_product_attention``, same function, no parameters, so checkpoints are shared);
``megatron`` keeps Megatron's module. The Transformer Engine spec ignores it (TE's fused attention).

The local spec's norms are :class:`megatron_rlhf.models.local_norm.LocalNorm` (torch norms that
also run under sequence parallelism; same parameters as Megatron's torch norm), and
:func:`decoder_spec` gives the whole decoder block, so its final norm is one too.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

import torch

from megatron_rlhf.models.arch import ArchSpec

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
LOCAL_ATTENTIONS = ("sdpa", "megatron")


class TransformerEngineUnavailable(RuntimeError):
    """The configuration asks for Transformer Engine, which is not usable here."""


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(requested: str) -> str:
    """``local`` or ``transformer_engine`` for a requested impl; raises if TE is asked but absent."""
    if requested not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl={requested!r} (choose from {TRANSFORMER_IMPLS})")
    if requested == "auto":
        if transformer_engine_installed() and torch.cuda.is_available():
            return "transformer_engine"
        return "local"
    if requested == "transformer_engine":
        if not transformer_engine_installed():
            raise TransformerEngineUnavailable(
                "transformer_impl='transformer_engine' but Transformer Engine is not installed; "
                "install it (`pip install transformer-engine[pytorch]`, GPU machines only) or "
                "use transformer_impl='local'"
            )
        if not torch.cuda.is_available():
            raise TransformerEngineUnavailable(
                "transformer_impl='transformer_engine' needs a CUDA device; use "
                "transformer_impl='local' on CPU"
            )
    return requested


def validate_local_attention(local_attention: str) -> None:
    """Raise a ValueError naming ``local_attention`` unless it is one of LOCAL_ATTENTIONS."""
    if local_attention not in LOCAL_ATTENTIONS:
        raise ValueError(f"local_attention={local_attention!r} (choose from {LOCAL_ATTENTIONS})")


def build_layer_spec(arch: ArchSpec, impl: str, local_attention: str = "sdpa") -> Any:
    """The Megatron-Core ``ModuleSpec`` of one transformer layer for ``arch``.

    ``local_attention`` picks the core attention of the local spec (see the module docstring);
    it is ignored for ``impl='transformer_engine'``.
    """
    validate_local_attention(local_attention)
    from megatron.core.models.gpt import gpt_layer_specs

    if impl == "transformer_engine":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_experts,
            moe_grouped_gemm=arch.is_moe,
            qk_layernorm=arch.qk_layernorm,
        )
    elif impl == "local":
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=arch.num_experts,
            moe_grouped_gemm=False,
            qk_layernorm=arch.qk_layernorm,
            normalization="RMSNorm",
        )
        if local_attention == "sdpa":
            from megatron_rlhf.models.sdpa_attention import SDPACoreAttention

            spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
        from megatron_rlhf.models.local_norm import with_local_norms

        spec = with_local_norms(spec)  # norms that also run under sequence parallelism
    else:
        raise ValueError(f"unresolved transformer_impl {impl!r}")
    if arch.post_sublayer_norms:
        from megatron_rlhf.models.sandwich_norm import with_sandwich_norms

        spec = with_sandwich_norms(spec)
    return spec


def decoder_spec(layer_spec: Any, config: Any, impl: str) -> Any:
    """What ``GPTModel`` takes as its layer spec: for the local spec, the decoder block of this
    pipeline stage with :class:`LocalNorm` as its final norm (Megatron's default is its torch
    norm, which refuses sequence parallelism); the layer spec itself under Transformer Engine."""
    if impl != "local":
        return layer_spec
    from megatron_rlhf.models.local_norm import LocalNorm
    from megatron_rlhf.parallel.megatron_compat import decoder_block_spec

    return decoder_block_spec(config, layer_spec, LocalNorm)


_TE_TO_LOCAL = (
    (re.compile(r"\.self_attention\.linear_qkv\.layer_norm_weight$"), ".input_layernorm.weight"),
    (re.compile(r"\.mlp\.linear_fc1\.layer_norm_weight$"), ".pre_mlp_layernorm.weight"),
    (
        re.compile(r"\.mlp\.experts\.linear_fc(\d)\.weight(\d+)$"),
        r".mlp.experts.local_experts.\2.linear_fc\1.weight",
    ),
)
_LOCAL_TO_TE_DENSE = (
    (re.compile(r"\.input_layernorm\.weight$"), ".self_attention.linear_qkv.layer_norm_weight"),
    (re.compile(r"\.pre_mlp_layernorm\.weight$"), ".mlp.linear_fc1.layer_norm_weight"),
)
_LOCAL_TO_TE_EXPERT = (
    re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.linear_fc(\d)\.weight$"),
    r".mlp.experts.linear_fc\2.weight\1",
)


def canonical_name(name: str, impl: str) -> str:
    """Local-spec name of a parameter named ``name`` in a model built with ``impl``."""
    if impl != "transformer_engine":
        return name
    for pattern, replacement in _TE_TO_LOCAL:
        name = pattern.sub(replacement, name)
    return name


def implementation_name(canonical: str, impl: str, is_moe_layer: bool) -> str:
    """Inverse of :func:`canonical_name` for a layer that is (not) an MoE layer."""
    if impl != "transformer_engine":
        return canonical
    pattern, replacement = _LOCAL_TO_TE_EXPERT
    canonical = pattern.sub(replacement, canonical)
    for pattern, replacement in _LOCAL_TO_TE_DENSE:
        if is_moe_layer and "pre_mlp_layernorm" in pattern.pattern:
            continue  # MoE layers keep a separate pre-MLP norm under TE too
        canonical = pattern.sub(replacement, canonical)
    return canonical
