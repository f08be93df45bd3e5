"""Every registered model family is complete, and a tiny model of each builds from its record.

CPU only, no network: the tiny HF models are built from random weights and saved to a temp dir.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from pathlib import Path

import pytest
import transformers
from safetensors import safe_open

from megatron_rlhf.mapping.registry import expand_rules
from megatron_rlhf.models.arch import arch_spec_from_hf_config, arch_spec_from_hf_dir
from megatron_rlhf.models.families.family import FamilyFeatures, ModelFamily
from megatron_rlhf.models.families.registry import (
    FAMILIES,
    SUPPORTED_MODEL_TYPES,
    family_for_model_type,
    family_named,
)
from megatron_rlhf.models.families.weight_rules import WeightRule
from megatron_rlhf.models.tiny import SUPPORTED_TINY_ARCHITECTURES, build_tiny_hf_model, tiny_hf_config

_IDS = [family.name for family in FAMILIES]


def test_each_family_is_listed_once_under_its_module_name():
    names = [family.name for family in FAMILIES]
    model_types = [model_type for family in FAMILIES for model_type in family.model_types]
    assert len(set(names)) == len(names)
    assert len(set(model_types)) == len(model_types) == len(SUPPORTED_MODEL_TYPES)
    for family in FAMILIES:
        module = importlib.import_module(f"megatron_rlhf.models.families.{family.name}")
        assert module.FAMILY is family
        assert family_named(family.name) is family
        assert all(family_for_model_type(t, "test") is family for t in family.model_types)
    assert SUPPORTED_TINY_ARCHITECTURES == tuple(family.model_types[0] for family in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES, ids=_IDS)
def test_every_family_provides_every_part(family: ModelFamily):
    for part in fields(ModelFamily):
        assert getattr(family, part.name), f"{family.name}: {part.name} is empty"
    assert all(isinstance(t, str) and t for t in family.model_types)
    assert family.hf_architecture.endswith("ForCausalLM")
    assert hasattr(transformers, family.hf_architecture), family.hf_architecture
    for part in ("check_features", "features", "global_rules", "layer_rules"):
        assert callable(getattr(family, part)), part
    assert family.tiny_config


@pytest.mark.parametrize("family", FAMILIES, ids=_IDS)
def test_hf_field_defaults_are_transformers_defaults(family: ModelFamily):
    """The defaults a family assumes for absent fields are its transformers config class's."""
    for model_type in family.model_types:
        reference = transformers.AutoConfig.for_model(model_type)
        for key, value in family.hf_field_defaults.items():
            actual = getattr(reference, key, None)
            if actual is None:  # transformers 5 keeps rope fields in rope_parameters
                actual = reference.rope_parameters[key]
            assert actual == value, f"{model_type}.{key}: transformers {actual!r}, family {value!r}"


@pytest.mark.parametrize("family", FAMILIES, ids=_IDS)
def test_tiny_model_builds_from_the_family_record(family: ModelFamily, tmp_path: Path):
    """The tiny config carries the record's fields, parses back to the family, and the family's
    weight rules name exactly the tensors its saved checkpoint holds."""
    model_type = family.model_types[0]
    config = tiny_hf_config(model_type, vocab_size=300)
    assert config.model_type == model_type
    for key, value in family.tiny_config.items():
        actual = getattr(config, key) if key != "partial_rotary_factor" else (
            config.rope_parameters[key])
        assert actual == value, key

    spec = arch_spec_from_hf_config(config.to_dict())
    assert spec.family == family.name and spec.hf_architecture == family.hf_architecture
    features = family.features(config.to_dict(), spec.num_layers, "tiny")
    assert isinstance(features, FamilyFeatures)
    assert all(getattr(spec, f.name) == getattr(features, f.name) for f in fields(FamilyFeatures))
    rules = family.global_rules(spec, "lm") + family.layer_rules(spec, spec.is_moe)
    assert rules and all(isinstance(rule, WeightRule) for rule in rules)

    build_tiny_hf_model(config, seed=0).save_pretrained(tmp_path, save_original_format=True)
    assert arch_spec_from_hf_dir(tmp_path) == spec
    with safe_open(tmp_path / "model.safetensors", framework="pt") as checkpoint:
        saved = set(checkpoint.keys())
    placed = expand_rules(spec, "lm")
    exported = [name for p in placed if not p.rule.import_only for name in p.rule.hf]
    assert len(exported) == len(set(exported))
    assert set(exported) == saved
    assert {name for p in placed for name in p.rule.hf} <= saved
