"""Architecture specs: a Hugging Face ``config.json`` read into one normalised, validated record.

:func:`arch_spec_from_hf_config` accepts the plain config dict (no transformers import needed) and
returns an :class:`ArchSpec` that the model provider and the weight mappings share. Every HF
feature that the Megatron model built from the spec could not reproduce exactly (sliding windows,
unknown rope scaling, MLP biases, ...) is rejected here with an :class:`UnsupportedArchitecture`
error that names the field and its value, before any work starts.

Supported families (``ArchSpec.family``): llama (Llama-2/3 style, GQA, untied), qwen2 (QKV bias,
tied or untied), qwen3 (QK norm), glm (GLM-4 in HF's ``GlmForCausalLM`` layout: QKV bias, partial
interleaved rotary, fused gate/up), glm4 (GLM-4-0414, ``Glm4ForCausalLM``: glm plus sandwich norms
after attention and MLP), qwen3_moe and mixtral (MoE, top-k softmax routing).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rlhf.config.errors import MissingInput, UserError

FAMILY_BY_MODEL_TYPE = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "glm": "glm",
    "glm4": "glm4",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
}
MOE_FAMILIES = frozenset({"qwen3_moe", "mixtral"})

_GLM_FIELD_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 2,
    "head_dim": 128,
    "rms_norm_eps": 1.5625e-07,
    "attention_bias": True,
    "partial_rotary_factor": 0.5,
    "max_position_embeddings": 131072,
}
HF_FIELD_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768},
    "glm": _GLM_FIELD_DEFAULTS,
    "glm4": _GLM_FIELD_DEFAULTS,
    "qwen3_moe": {"num_key_value_heads": 4, "max_position_embeddings": 32768},
    "mixtral": {
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 131072,
    },
}
"""What transformers 5.19 assumes, per ``model_type``, for a field that ``config.json`` leaves
out (its config classes' defaults). The HF model, and so the weights on disk, follow these values,
so the spec does too. Fields not listed here default alike for every family: no KV heads or null
means MHA, no head_dim means hidden_size / heads, rms_norm_eps 1e-6, rope_theta 10000."""


class UnsupportedArchitecture(UserError):
    """The HF config describes a model this package cannot reproduce exactly."""


@dataclass(frozen=True)
class ArchSpec:
    """A decoder-only transformer in the terms Megatron-Core needs."""

    family: str
    """Mapping family: one of FAMILY_BY_MODEL_TYPE's values."""
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


def load_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """Read ``config.json`` from an HF model directory, with file-naming errors."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise MissingInput(f"{path}: no config.json in the Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _require(config: dict[str, Any], key: str, where: str) -> Any:
    if key not in config or config[key] is None:
        raise UnsupportedArchitecture(f"{where}: missing required field {key!r}")
    return config[key]


def _integer(config: dict[str, Any], key: str, where: str, default: Any = None) -> int:
    """``config[key]`` (or ``default`` when absent/None) as a positive integer; names the field."""
    value = config.get(key)
    if value is None:
        value = default if default is not None else _require(config, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise UnsupportedArchitecture(f"{where}: {key}={value!r} must be a positive integer")
    return int(value)


def _rope(config: dict[str, Any], where: str) -> tuple[float, float, float | None]:
    """(theta, partial_rotary_factor, llama3 scaling factor) from old- or new-style fields."""
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    partial = parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    rope_type = parameters.get("rope_type", parameters.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), float(partial), None
    if rope_type == "llama3":
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
        for key, value in expected.items():
            if float(parameters.get(key, value)) != value:
                raise UnsupportedArchitecture(
                    f"{where}: llama3 rope scaling with {key}={parameters.get(key)} is not "
                    f"supported (Megatron-Core implements {key}={value})"
                )
        # transformers: a top-level original_max_position_embeddings wins, then the rope dict's,
        # then max_position_embeddings.
        original = config.get("original_max_position_embeddings") or parameters.get(
            "original_max_position_embeddings", config.get("max_position_embeddings")
        )
        if int(original) != 8192:
            raise UnsupportedArchitecture(
                f"{where}: llama3 rope scaling with original_max_position_embeddings="
                f"{original} is not supported (Megatron-Core implements 8192)"
            )
        return float(theta), float(partial), float(parameters.get("factor", 8.0))
    raise UnsupportedArchitecture(
        f"{where}: rope type {rope_type!r} is not supported (supported: default, llama3)"
    )


def _reject_unsupported_features(config: dict[str, Any], family: str, where: str) -> None:
    activation = config.get("hidden_act", "silu")
    if activation not in ("silu", "swish"):
        raise UnsupportedArchitecture(f"{where}: hidden_act={activation!r} (supported: silu)")
    if config.get("use_sliding_window"):
        raise UnsupportedArchitecture(f"{where}: use_sliding_window=true is not supported")
    windowed = sorted(set(config.get("layer_types") or []) - {"full_attention"})
    if windowed:
        raise UnsupportedArchitecture(
            f"{where}: layer_types contains {windowed} (only full_attention is supported)"
        )
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise UnsupportedArchitecture(
            f"{where}: quantization_config (quant_method={method!r}) is not supported; convert "
            "the unquantized checkpoint"
        )
    if family in ("llama", "mixtral") and config.get("sliding_window"):
        raise UnsupportedArchitecture(
            f"{where}: sliding_window={config['sliding_window']} is not supported"
        )
    if config.get("mlp_bias"):
        raise UnsupportedArchitecture(f"{where}: mlp_bias=true is not supported")
    if family == "llama" and config.get("attention_bias"):
        raise UnsupportedArchitecture(
            f"{where}: attention_bias=true for llama also biases o_proj, which Megatron's "
            "GPT layer cannot represent"
        )
    if family in ("qwen3", "qwen3_moe") and config.get("attention_bias"):
        raise UnsupportedArchitecture(f"{where}: attention_bias=true is not supported for qwen3")


def _moe_fields(config: dict[str, Any], family: str, num_layers: int, where: str) -> dict:
    if family == "mixtral":
        experts = _require(config, "num_local_experts", where)
        width = _require(config, "intermediate_size", where)
        normalise = True
        pattern = (1,) * num_layers
    else:
        # transformers >= 5 writes num_local_experts; older Hub configs say num_experts.
        experts = config.get("num_experts") or _require(config, "num_local_experts", where)
        width = _require(config, "moe_intermediate_size", where)
        normalise = bool(config.get("norm_topk_prob", False))
        step = int(config.get("decoder_sparse_step", 1))
        dense_layers = set(config.get("mlp_only_layers") or [])
        if step < 1:
            raise UnsupportedArchitecture(f"{where}: decoder_sparse_step={step} must be >= 1")
        pattern = tuple(
            0 if (layer in dense_layers or (layer + 1) % step != 0) else 1
            for layer in range(num_layers)
        )
        if config.get("shared_expert_intermediate_size"):
            raise UnsupportedArchitecture(f"{where}: shared experts are not supported")
    topk = int(_require(config, "num_experts_per_tok", where))
    if not 1 <= topk <= int(experts):
        raise UnsupportedArchitecture(
            f"{where}: num_experts_per_tok={topk} must be in [1, {experts}]"
        )
    return {
        "num_experts": int(experts),
        "moe_ffn_hidden_size": int(width),
        "moe_router_topk": topk,
        "moe_router_pre_softmax": not normalise,
        "moe_layer_pattern": pattern,
    }


def arch_spec_from_hf_config(config: dict[str, Any], source: str = "config.json") -> ArchSpec:
    """Validate an HF config dict and return its :class:`ArchSpec`.

    ``source`` names where the config came from, for error messages.
    """
    model_type = config.get("model_type")
    if model_type not in FAMILY_BY_MODEL_TYPE:
        supported = ", ".join(sorted(FAMILY_BY_MODEL_TYPE))
        raise UnsupportedArchitecture(
            f"{source}: model_type={model_type!r} is not supported (supported: {supported})"
        )
    family = FAMILY_BY_MODEL_TYPE[model_type]
    absent = {key for key in HF_FIELD_DEFAULTS[model_type] if key not in config}
    config = {**HF_FIELD_DEFAULTS[model_type], **config}
    architectures = config.get("architectures") or []
    hf_architecture = architectures[0] if architectures else ""
    if hf_architecture and not hf_architecture.endswith("ForCausalLM"):
        raise UnsupportedArchitecture(
            f"{source}: architectures={architectures} (only *ForCausalLM checkpoints convert)"
        )
    _reject_unsupported_features(config, family, source)

    num_layers = _integer(config, "num_hidden_layers", source)
    hidden_size = _integer(config, "hidden_size", source)
    heads = _integer(config, "num_attention_heads", source)
    groups = _integer(config, "num_key_value_heads", source, default=heads)
    head_dim = _integer(config, "head_dim", source, default=max(hidden_size // heads, 1))
    if heads % groups != 0:
        defaulted = (
            f" (absent from the config: transformers' default for {model_type})"
            if "num_key_value_heads" in absent
            else ""
        )
        raise UnsupportedArchitecture(
            f"{source}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={groups}{defaulted}"
        )
    theta, partial, scaling = _rope(config, source)
    rotary_dims = head_dim * partial
    if not math.isclose(rotary_dims, round(rotary_dims)) or round(rotary_dims) % 2:
        raise UnsupportedArchitecture(
            f"{source}: partial_rotary_factor={partial} with head_dim={head_dim} does not give "
            "an even number of rotary dims"
        )
    moe = _moe_fields(config, family, num_layers, source) if family in MOE_FAMILIES else {}
    return ArchSpec(
        family=family,
        model_type=model_type,
        hf_architecture=hf_architecture or _default_architecture(model_type),
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        ffn_hidden_size=_integer(config, "intermediate_size", source),
        vocab_size=_integer(config, "vocab_size", source),
        max_position_embeddings=_integer(config, "max_position_embeddings", source, default=4096),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rotary_percent=partial,
        rotary_interleaved=family in ("glm", "glm4"),
        rope_scaling_factor=scaling,
        qkv_bias=family == "qwen2"
        or (family in ("glm", "glm4") and bool(config.get("attention_bias"))),
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        post_sublayer_norms=family == "glm4",
        **moe,
    )


def _default_architecture(model_type: str) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "glm": "GlmForCausalLM",
        "glm4": "Glm4ForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
        "mixtral": "MixtralForCausalLM",
    }[model_type]


def arch_spec_from_hf_dir(hf_dir: str | Path) -> ArchSpec:
    """Load and validate ``config.json`` of an HF model directory."""
    return arch_spec_from_hf_config(load_hf_config(hf_dir), source=str(Path(hf_dir) / "config.json"))
