"""PrecisionConfig: every mode/recipe/format maps onto the expected Megatron TransformerConfig
fields (checked against a real TransformerConfig), and validation refuses what this machine or
the detected GPU cannot run, naming the setting."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from megatron_rlhf.config.precision import (
    FP8_FORMATS,
    FP8_RECIPES,
    PrecisionConfig,
    PrecisionError,
    engine_dtype,
    torch_dtype_fields,
    transformer_config_fields,
    validate_precision_environment,
)


def _megatron_config(fields: dict):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                             activation_func=torch.nn.functional.silu, **torch_dtype_fields(fields))


def test_fp32_and_bf16_fields():
    import torch

    fp32 = _megatron_config(transformer_config_fields(PrecisionConfig()))
    assert fp32.params_dtype is torch.float32 and not fp32.bf16 and fp32.fp8 is None
    bf16 = _megatron_config(transformer_config_fields(PrecisionConfig(mode="bf16")))
    assert bf16.params_dtype is torch.bfloat16 and bf16.pipeline_dtype is torch.bfloat16
    assert bf16.bf16 and not bf16.fp16 and bf16.fp8 is None and not bf16.fp8_param
    assert engine_dtype(PrecisionConfig()) == "float32"
    assert engine_dtype(PrecisionConfig(mode="bf16")) == "bfloat16"


@pytest.mark.parametrize(
    "recipe, fmt, params, ends",
    [c for c in itertools.product(FP8_RECIPES, FP8_FORMATS, (False, True), (False, True))
     if not (c[0] == "delayed" and c[3])],
)
def test_every_fp8_combination_maps_onto_transformer_config(recipe, fmt, params, ends):
    import torch

    precision = PrecisionConfig(mode="fp8", fp8_recipe=recipe, fp8_format=fmt, fp8_params=params,
                                first_last_layers_bf16=ends, bf16_layers_at_start=1, bf16_layers_at_end=2)
    config = _megatron_config(transformer_config_fields(precision))
    assert config.fp8 == fmt and config.fp8_recipe == recipe and config.fp8_param is params
    assert config.bf16 and config.params_dtype is torch.bfloat16
    assert config.first_last_layers_bf16 is ends
    if ends:
        assert (config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16) == (1, 2)
    if recipe == "delayed":
        assert config.fp8_amax_history_len == 1024 and config.fp8_amax_compute_algo == "max"
    assert precision.uses_transformer_engine and engine_dtype(precision) == "bfloat16"


@pytest.mark.parametrize("overrides, named", [
    (dict(mode="fp16"), "precision.mode='fp16'"),
    (dict(mode="fp8", fp8_recipe="mxfp4"), "precision.fp8_recipe='mxfp4'"),
    (dict(mode="fp8", fp8_format="e5m2"), "precision.fp8_format='e5m2'"),
    (dict(mode="bf16", fp8_params=True), "precision.fp8_params=true needs precision.mode=fp8"),
    (dict(mode="bf16", first_last_layers_bf16=True), "precision.first_last_layers_bf16=true"),
    (dict(mode="fp8", first_last_layers_bf16=True), "fp8_recipe='delayed'"),
    (dict(mode="fp8", fp8_recipe="tensorwise", bf16_layers_at_start=-1), "bf16_layers_at_start=-1"),
])
def test_invalid_settings_are_named(overrides, named):
    with pytest.raises(PrecisionError, match=named.replace("(", r"\(").replace("[", r"\[")):
        PrecisionConfig(**overrides)


def test_fp8_without_transformer_engine_fails_naming_the_setting():
    with pytest.raises(PrecisionError, match=r"train\.yaml: precision\.mode='fp8' needs Transformer Engine"):
        validate_precision_environment(PrecisionConfig(mode="fp8"), te_installed=False,
                                       gpu_capability=(9, 0), where="train.yaml: precision")


def test_fp8_on_this_machine_fails_without_te():
    """This CPU machine has no Transformer Engine: detection (not an injected flag) refuses fp8."""
    from megatron_rlhf.config.precision import transformer_engine_installed

    if transformer_engine_installed():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(PrecisionError, match="precision.mode='fp8' needs Transformer Engine"):
        validate_precision_environment(PrecisionConfig(mode="fp8", fp8_recipe="tensorwise"))


@pytest.mark.parametrize("recipe, capability, ok", [
    ("delayed", (8, 9), True), ("delayed", (8, 0), False),
    ("tensorwise", (9, 0), True), ("tensorwise", (8, 6), False),
    ("blockwise", (9, 0), True), ("blockwise", (8, 9), False),
    ("mxfp8", (10, 0), True), ("mxfp8", (9, 0), False),
])
def test_recipe_needs_its_gpu_generation(recipe, capability, ok):
    precision = PrecisionConfig(mode="fp8", fp8_recipe=recipe)
    if ok:
        validate_precision_environment(precision, te_installed=True, gpu_capability=capability)
        return
    with pytest.raises(PrecisionError, match=f"precision.fp8_recipe='{recipe}' needs"):
        validate_precision_environment(precision, te_installed=True, gpu_capability=capability)


def test_fp8_needs_a_gpu_and_bf16_needs_ampere():
    with pytest.raises(PrecisionError, match="needs a CUDA GPU"):
        validate_precision_environment(PrecisionConfig(mode="fp8"), te_installed=True, gpu_capability=None)
    with pytest.raises(PrecisionError, match="precision.mode='bf16' needs an Ampere"):
        validate_precision_environment(PrecisionConfig(mode="bf16"), gpu_capability=(7, 0))
    validate_precision_environment(PrecisionConfig(mode="bf16"), gpu_capability=None)  # CPU bf16
    validate_precision_environment(PrecisionConfig(), gpu_capability=(6, 0))


def test_importing_the_config_modules_imports_no_torch():
    code = ("import sys, megatron_rlhf.config.precision, megatron_rlhf.config.resources; "
            "assert 'torch' not in sys.modules and 'transformer_engine' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
