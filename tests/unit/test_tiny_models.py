"""Tiny local HF models and tokenizers (megatron_rlhf.models.tiny). CPU only, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from megatron_rlhf.models import tiny

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return tiny.train_tiny_tokenizer(vocab_size=512, seed=0)


@pytest.fixture(scope="module")
def saved_models(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: transformers.PreTrainedTokenizerFast
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        arch: tiny.make_tiny_hf_model(arch, root / arch, tokenizer=tokenizer)
        for arch in tiny.SUPPORTED_TINY_ARCHITECTURES
    }


def _saved_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", framework="pt") as checkpoint:
        return {name: checkpoint.get_tensor(name) for name in checkpoint.keys()}


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("vocab_size", [262, 512, 1024, 2048])
def test_tokenizer_has_exactly_vocab_size_tokens(vocab_size: int) -> None:
    assert len(tiny.train_tiny_tokenizer(vocab_size)) == vocab_size


def test_tokenizer_is_deterministic_for_a_seed() -> None:
    first = tiny.train_tiny_tokenizer(512, seed=3).backend_tokenizer.to_str()
    second = tiny.train_tiny_tokenizer(512, seed=3).backend_tokenizer.to_str()
    other_seed = tiny.train_tiny_tokenizer(512, seed=4).backend_tokenizer.to_str()
    assert first == second
    assert first != other_seed


def test_special_tokens_have_fixed_ids(tokenizer: transformers.PreTrainedTokenizerFast) -> None:
    assert tokenizer.convert_tokens_to_ids(list(tiny.SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    )


@pytest.mark.parametrize("vocab_size", [100, 100_000])
def test_unreachable_vocab_size_raises(vocab_size: int) -> None:
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size}"):
        tiny.train_tiny_tokenizer(vocab_size)


def test_chat_template_renders_roles_and_generation_prompt(
    tokenizer: transformers.PreTrainedTokenizerFast,
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|bos|><|system|>Be brief.<|eos|><|user|>What is 2 + 3?<|eos|><|assistant|>5<|eos|>"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|eos|><|assistant|>")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert prompt_ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert tokenizer.decode(prompt_ids) == prompt


def test_chat_template_rejects_unknown_role(
    tokenizer: transformers.PreTrainedTokenizerFast,
) -> None:
    with pytest.raises(Exception, match="Unknown chat role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("architecture", tiny.SUPPORTED_TINY_ARCHITECTURES)
def test_config_has_tiny_sizes(architecture: str) -> None:
    config = tiny.tiny_hf_config(architecture)
    assert config.model_type == architecture
    assert (config.hidden_size, config.num_hidden_layers) == (128, NUM_LAYERS)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert getattr(config, "head_dim", None) in (None, 32)
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 2)


def test_config_family_settings() -> None:
    tied = {
        arch for arch in tiny.SUPPORTED_TINY_ARCHITECTURES
        if tiny.tiny_hf_config(arch).tie_word_embeddings
    }
    assert tied == {"qwen2", "qwen3"}
    for architecture in ("glm", "glm4"):
        config = tiny.tiny_hf_config(architecture)
        assert config.rope_parameters["partial_rotary_factor"] == 0.5
        assert config.attention_bias
    assert tiny.tiny_hf_config("qwen3_moe").num_experts == 4
    assert tiny.tiny_hf_config("mixtral").num_local_experts == 4


def test_config_overrides_are_applied_last() -> None:
    config = tiny.tiny_hf_config("llama", num_hidden_layers=2, rope_theta=500000.0, eos_token_id=7)
    assert config.num_hidden_layers == 2
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.eos_token_id == 7


def test_config_takes_token_ids_from_tokenizer() -> None:
    tokenizer = tiny.train_tiny_tokenizer(300)
    tokenizer.pad_token = "<|eos|>"
    config = tiny.tiny_hf_config("qwen3", vocab_size=320, tokenizer=tokenizer)
    assert (config.pad_token_id, config.vocab_size) == (1, 320)
    with pytest.raises(ValueError, match="300 tokens"):
        tiny.tiny_hf_config("qwen3", vocab_size=256, tokenizer=tokenizer)


def test_unknown_architecture_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"'gpt5'.*llama, qwen2, qwen3, glm, glm4, qwen3_moe"):
        tiny.tiny_hf_config("gpt5")


# ----------------------------------------------------------------------------- models

# Layer-0 modules whose ``.weight`` transformers 5.19 writes, beyond attention projections and
# the two pre-norms. MoE experts are saved per expert even though the modules hold them fused.
_DENSE_MLP = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
_QK_NORM = {"self_attn.q_norm", "self_attn.k_norm"}
_GLM_MLP = {"mlp.gate_up_proj", "mlp.down_proj"}
_EXPECTED_LAYER0_MODULES = {
    "llama": _DENSE_MLP,
    "qwen2": _DENSE_MLP,
    "qwen3": _DENSE_MLP | _QK_NORM,
    "glm": _GLM_MLP,
    "glm4": _GLM_MLP | {"post_self_attn_layernorm", "post_mlp_layernorm"},
    "qwen3_moe": {"mlp.gate"}
    | _QK_NORM
    | {f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")},
    "mixtral": {"block_sparse_moe.gate"}
    | {f"block_sparse_moe.experts.{e}.{w}" for e in range(4) for w in ("w1", "w2", "w3")},
}
_ATTENTION_AND_NORMS = {f"self_attn.{p}_proj" for p in "qkvo"} | {
    "input_layernorm",
    "post_attention_layernorm",
}
_QKV_BIAS_ARCHITECTURES = {"qwen2", "glm", "glm4"}


@pytest.mark.parametrize("architecture", tiny.SUPPORTED_TINY_ARCHITECTURES)
def test_on_disk_tensor_names(architecture: str, saved_models: dict[str, Path]) -> None:
    tensors = _saved_tensors(saved_models[architecture])
    layer0 = {
        name.removeprefix("model.layers.0.")
        for name in tensors
        if name.startswith("model.layers.0.")
    }
    modules = _EXPECTED_LAYER0_MODULES[architecture] | _ATTENTION_AND_NORMS
    expected = {f"{module}.weight" for module in modules}
    if architecture in _QKV_BIAS_ARCHITECTURES:
        expected |= {f"self_attn.{p}_proj.bias" for p in "qkv"}
    assert layer0 == expected
    assert ("lm_head.weight" in tensors) == (architecture not in {"qwen2", "qwen3"})
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}


@pytest.mark.parametrize("architecture", tiny.SUPPORTED_TINY_ARCHITECTURES)
def test_saved_model_reloads_bit_identically(
    architecture: str,
    saved_models: dict[str, Path],
    tokenizer: transformers.PreTrainedTokenizerFast,
) -> None:
    reloaded, loading_info = transformers.AutoModelForCausalLM.from_pretrained(
        saved_models[architecture], output_loading_info=True
    )
    assert all(not problems for problems in loading_info.values()), loading_info
    config = tiny.tiny_hf_config(architecture, tokenizer=tokenizer)
    expected = tiny.build_tiny_hf_model(config, seed=0)
    expected_state, reloaded_state = expected.state_dict(), reloaded.state_dict()
    assert expected_state.keys() == reloaded_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(tensor, reloaded_state[name]), name


@pytest.mark.parametrize("architecture", tiny.SUPPORTED_TINY_ARCHITECTURES)
def test_saved_norms_are_not_ones_and_biases_not_zero(
    architecture: str, saved_models: dict[str, Path]
) -> None:
    tensors = _saved_tensors(saved_models[architecture])
    norms = {name: tensor for name, tensor in tensors.items() if "norm" in name}
    norms_per_layer = 2 + 2 * (architecture in {"qwen3", "qwen3_moe", "glm4"})
    assert len(norms) == NUM_LAYERS * norms_per_layer + 1
    for name, tensor in norms.items():
        assert not torch.all(tensor == 1.0), name
    biases = [tensor for name, tensor in tensors.items() if name.endswith(".bias")]
    assert len(biases) == (NUM_LAYERS * 3 if architecture in _QKV_BIAS_ARCHITECTURES else 0)
    assert all(torch.count_nonzero(bias) == bias.numel() for bias in biases)


def test_saved_tokenizer_reloads(
    saved_models: dict[str, Path], tokenizer: transformers.PreTrainedTokenizerFast
) -> None:
    reloaded = transformers.AutoTokenizer.from_pretrained(saved_models["llama"])
    text = "Alice has 12 apples. def sort_list(values):"
    assert len(reloaded) == len(tokenizer)
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.chat_template == tokenizer.chat_template


def test_model_weights_depend_only_on_seed() -> None:
    config = tiny.tiny_hf_config("qwen3_moe")
    rng_state = torch.random.get_rng_state()
    first = tiny.build_tiny_hf_model(config, seed=1).state_dict()
    second = tiny.build_tiny_hf_model(config, seed=1).state_dict()
    other_seed = tiny.build_tiny_hf_model(config, seed=2).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert all(torch.equal(first[name], second[name]) for name in first)
    embedding = "model.embed_tokens.weight"
    assert not torch.equal(first[embedding], other_seed[embedding])


@pytest.mark.parametrize("architecture", tiny.SUPPORTED_TINY_ARCHITECTURES)
def test_forward_pass_gives_finite_logits(architecture: str) -> None:
    model = tiny.build_tiny_hf_model(tiny.tiny_hf_config(architecture))
    input_ids = torch.tensor([[0, 3, 100, 200, 300, 1, 4]])
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, 7, 512)
    assert torch.isfinite(logits).all()
