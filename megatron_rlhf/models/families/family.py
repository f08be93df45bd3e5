"""The record each model family fills in, and the small helpers family modules share.

A :class:`ModelFamily` is everything the package knows about one architecture family, in one
place: the HF ``model_type`` values it reads, transformers' defaults for fields a ``config.json``
may leave out, the features it refuses, the ArchSpec features it switches on, its weight rules
(HF <-> Megatron names) and the fields of its tiny test model. The generic config parser
(:mod:`megatron_rlhf.models.arch`), the mapping engine (:mod:`megatron_rlhf.mapping.registry`) and
the tiny-model factory (:mod:`megatron_rlhf.models.tiny`) read these records through
:mod:`megatron_rlhf.models.families.registry`; none of them branches on a family's name.

Guarantee: everything here is pure Python over plain dicts (no torch, no transformers), so
reading a family costs nothing at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from megatron_rlhf.models.arch_spec import ArchSpec, UnsupportedArchitecture
from megatron_rlhf.models.families.weight_rules import WeightRule

HFConfig = Mapping[str, Any]
"""A parsed HF ``config.json`` (with the family's defaults filled in)."""


@dataclass(frozen=True)
class FamilyFeatures:
    """The :class:`ArchSpec` fields a family decides from its config (names as in ArchSpec)."""

    qkv_bias: bool = False
    qk_layernorm: bool = False
    rotary_interleaved: bool = False
    post_sublayer_norms: bool = False
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int | None = None
    moe_router_pre_softmax: bool = False
    moe_layer_pattern: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ModelFamily:
    """One architecture family: its HF types, defaults, checks, weight rules and tiny config."""

    name: str
    """``ArchSpec.family``; also the name of the module that defines the family."""
    model_types: tuple[str, ...]
    """HF ``model_type`` values read as this family; the first one is the tiny test model's."""
    hf_architecture: str
    """HF class name assumed when ``config.json`` lists no ``architectures``."""
    hf_field_defaults: Mapping[str, Any]
    """What transformers 5.19 assumes for a field ``config.json`` leaves out (its config class's
    defaults). The HF model, and so the weights on disk, follow these values, so the spec does
    too. Fields not listed default alike for every family: no KV heads or null means MHA, no
    head_dim means hidden_size / heads, rms_norm_eps 1e-6, rope_theta 10000."""
    check_features: Callable[[HFConfig, str], None]
    """``(config, source)``: raise :class:`UnsupportedArchitecture` naming the field for a feature
    of this family the Megatron model cannot reproduce. The checks every family shares (activation,
    sliding windows, quantization, MLP bias, rope type) run in :mod:`megatron_rlhf.models.arch`."""
    features: Callable[[HFConfig, int, str], FamilyFeatures]
    """``(config, num_layers, source)``: the ArchSpec features of this family (QKV bias, QK norm,
    interleaved rotary, sandwich norms, routed experts)."""
    global_rules: Callable[[ArchSpec, str], list[WeightRule]]
    """``(arch, role)``: embedding, final norm and output layer / scalar head rules."""
    layer_rules: Callable[[ArchSpec, bool], list[WeightRule]]
    """``(arch, moe_layer)``: one decoder layer's rules, with ``{layer}``/``{expert}`` templates."""
    tiny_config: Mapping[str, Any]
    """HF config fields of the tiny test model on top of the sizes every tiny model shares
    (:mod:`megatron_rlhf.models.tiny`); ``partial_rotary_factor`` goes into ``rope_parameters``."""


def require_field(config: HFConfig, key: str, where: str) -> Any:
    """``config[key]``; raises :class:`UnsupportedArchitecture` naming the field when absent/null."""
    if key not in config or config[key] is None:
        raise UnsupportedArchitecture(f"{where}: missing required field {key!r}")
    return config[key]


def no_family_checks(config: HFConfig, where: str) -> None:
    """For a family whose features beyond the shared checks are all supported."""


def reject_sliding_window(config: HFConfig, where: str) -> None:
    """Refuse ``sliding_window`` where the family applies it whenever it is set."""
    if config.get("sliding_window"):
        raise UnsupportedArchitecture(
            f"{where}: sliding_window={config['sliding_window']} is not supported"
        )


def routed_expert_features(
    config: HFConfig,
    *,
    num_experts: int,
    ffn_width: int,
    renormalise: bool,
    layer_pattern: tuple[int, ...],
    qk_layernorm: bool,
    where: str,
) -> FamilyFeatures:
    """Features of a top-k softmax-routed MoE; validates ``num_experts_per_tok``."""
    topk = int(require_field(config, "num_experts_per_tok", where))
    if not 1 <= topk <= int(num_experts):
        raise UnsupportedArchitecture(
            f"{where}: num_experts_per_tok={topk} must be in [1, {num_experts}]"
        )
    return FamilyFeatures(
        qk_layernorm=qk_layernorm,
        num_experts=int(num_experts),
        moe_ffn_hidden_size=int(ffn_width),
        moe_router_topk=topk,
        moe_router_pre_softmax=not renormalise,
        moe_layer_pattern=layer_pattern,
    )
