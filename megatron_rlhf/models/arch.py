"""Architecture specs: a Hugging Face ``config.json`` read into one normalised, validated record.

:func:`arch_spec_from_hf_config` accepts the plain config dict (no transformers import needed) and
returns an :class:`ArchSpec` that the model provider and the weight mappings share. Every HF
feature that the Megatron model built from the spec could not reproduce exactly (sliding windows,
unknown rope scaling, MLP biases, ...) is rejected here with an :class:`UnsupportedArchitecture`
error that names the field and its value, before any work starts.

The parsing here is generic: what differs per family (its HF model types, transformers' defaults,
the features it refuses or switches on) comes from its record in
:mod:`megatron_rlhf.models.families`, looked up by ``model_type`` in
:mod:`megatron_rlhf.models.families.registry`. ``ArchSpec`` and ``UnsupportedArchitecture`` are
defined in :mod:`megatron_rlhf.models.arch_spec` and re-exported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megatron_rlhf.config.errors import MissingInput, UserError
from megatron_rlhf.models.arch_spec import ArchSpec, UnsupportedArchitecture
from megatron_rlhf.models.families.family import require_field
from megatron_rlhf.models.families.registry import family_for_model_type

__all__ = [
    "ArchSpec",
    "UnsupportedArchitecture",
    "arch_spec_from_hf_config",
    "arch_spec_from_hf_dir",
    "load_hf_config",
]


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


def _integer(config: dict[str, Any], key: str, where: str, default: Any = None) -> int:
    """``config[key]`` (or ``default`` when absent/None) as a positive integer; names the field."""
    value = config.get(key)
    if value is None:
        value = default if default is not None else require_field(config, key, where)
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


def _reject_unsupported_features(config: dict[str, Any], where: str) -> None:
    """The checks every family shares; each family adds its own (``ModelFamily.check_features``)."""
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
    if config.get("mlp_bias"):
        raise UnsupportedArchitecture(f"{where}: mlp_bias=true is not supported")


def arch_spec_from_hf_config(config: dict[str, Any], source: str = "config.json") -> ArchSpec:
    """Validate an HF config dict and return its :class:`ArchSpec`.

    ``source`` names where the config came from, for error messages.
    """
    model_type = config.get("model_type")
    family = family_for_model_type(model_type, source)
    absent = {key for key in family.hf_field_defaults if key not in config}
    config = {**family.hf_field_defaults, **config}
    architectures = config.get("architectures") or []
    hf_architecture = architectures[0] if architectures else ""
    if hf_architecture and not hf_architecture.endswith("ForCausalLM"):
        raise UnsupportedArchitecture(
            f"{source}: architectures={architectures} (only *ForCausalLM checkpoints convert)"
        )
    _reject_unsupported_features(config, source)
    family.check_features(config, source)

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
    features = family.features(config, num_layers, source)
    return ArchSpec(
        family=family.name,
        model_type=model_type,
        hf_architecture=hf_architecture or family.hf_architecture,
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
        rope_scaling_factor=scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        **asdict(features),
    )


def arch_spec_from_hf_dir(hf_dir: str | Path) -> ArchSpec:
    """Load and validate ``config.json`` of an HF model directory."""
    return arch_spec_from_hf_config(load_hf_config(hf_dir), source=str(Path(hf_dir) / "config.json"))
