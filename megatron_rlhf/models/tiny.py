"""Tiny Hugging Face models and tokenizers, made locally for tests and the demo.

Nothing here touches a model hub: the tokenizer is trained on synthetic text generated in code and
the models are built from a config with random weights.

What it guarantees
------------------
* ``train_tiny_tokenizer(vocab_size, seed)`` returns a byte-level BPE tokenizer whose
  ``len(tokenizer)`` is exactly ``vocab_size`` (special tokens included; 262 up to about 2300
  for the built-in corpus), identical for a given ``(vocab_size, seed)``, in any process. The
  special tokens always take ids 0..5 in the order of ``SPECIAL_TOKENS``: ``<|bos|>`` 0,
  ``<|eos|>`` 1, ``<|pad|>`` 2, ``<|user|>`` 3, ``<|assistant|>`` 4, ``<|system|>`` 5. Its chat
  template renders each message as ``<|role|>content<|eos|>`` after a leading ``<|bos|>``;
  ``add_generation_prompt`` appends ``<|assistant|>``; an unknown role raises.
* ``tiny_hf_config(architecture)`` returns the transformers config class of that model type with
  hidden 128, 4 layers, 4 query heads, 2 KV heads, head_dim 32, FFN 256, 256 positions, RoPE theta
  10000 (in transformers 5 this lives in ``config.rope_parameters``, not ``rope_theta``), plus the
  family's own fields (``tiny_config`` of its record in :mod:`megatron_rlhf.models.families`).
* ``make_tiny_hf_model(...)`` writes a float32 ``model.safetensors`` + config + tokenizer whose
  weights depend only on ``(architecture, seed, vocab_size, overrides)``; every norm weight is
  ``1 + 0.1 * N(0, 1)`` and every bias ``0.02 * N(0, 1)``, so a weight converter that forgets a
  norm or a bias is caught. ``AutoModelForCausalLM.from_pretrained`` reloads it bit-identically.

What it does NOT guarantee: the models are untrained (logits are noise); the random weights are
not promised stable across torch/transformers versions (initialisers may draw differently).

On-disk layout written by transformers 5.19 (``save_original_format=True``, the default)
------------------------------------------------------------------------------------------
Every checkpoint has ``model.embed_tokens.weight [V, 128]`` and ``model.norm.weight [128]``.
Untied models (llama, glm, glm4, qwen3_moe, mixtral) also have ``lm_head.weight [V, 128]``; tied
ones (qwen2, qwen3) do NOT write ``lm_head.weight`` (config ``tie_word_embeddings=True``).
Per layer ``model.layers.{i}.`` (q 4x32=128, kv 2x32=64):

* all: ``input_layernorm.weight [128]``, ``post_attention_layernorm.weight [128]``,
  ``self_attn.q_proj.weight [128, 128]``, ``self_attn.k_proj.weight [64, 128]``,
  ``self_attn.v_proj.weight [64, 128]``, ``self_attn.o_proj.weight [128, 128]``.
* qwen2, glm, glm4 add ``self_attn.{q,k,v}_proj.bias`` ([128], [64], [64]); o_proj has no bias.
* qwen3, qwen3_moe add ``self_attn.q_norm.weight [32]`` and ``self_attn.k_norm.weight [32]``.
* dense llama/qwen2/qwen3 MLP: ``mlp.gate_proj.weight [256, 128]``, ``mlp.up_proj.weight
  [256, 128]``, ``mlp.down_proj.weight [128, 256]``.
* glm, glm4 MLP is stored FUSED, as in the module: ``mlp.gate_up_proj.weight [512, 128]`` (rows
  0..255 gate, 256..511 up) and ``mlp.down_proj.weight [128, 256]``.
* glm4 adds two sandwich norms: ``post_self_attn_layernorm.weight [128]`` (on the attention
  output, before the residual add) and ``post_mlp_layernorm.weight [128]`` (on the MLP output).
* qwen3_moe: in memory the experts are fused (``mlp.experts.gate_up_proj [4, 128, 128]``,
  ``mlp.experts.down_proj [4, 128, 64]``) but the saver reverts the conversion, so the file holds
  PER-EXPERT tensors: ``mlp.gate.weight [4, 128]`` and ``mlp.experts.{e}.gate_proj.weight
  [64, 128]``, ``mlp.experts.{e}.up_proj.weight [64, 128]``, ``mlp.experts.{e}.down_proj.weight
  [128, 64]``.
* mixtral: likewise per-expert on disk, under the legacy ``block_sparse_moe`` prefix:
  ``block_sparse_moe.gate.weight [4, 128]``, ``block_sparse_moe.experts.{e}.w1.weight [256, 128]``
  (gate), ``...w3.weight [256, 128]`` (up), ``...w2.weight [128, 256]`` (down). In memory it is
  ``mlp.gate.weight`` and fused ``mlp.experts.gate_up_proj [4, 512, 128]`` / ``down_proj``.

RoPE: glm and glm4 rotate only the first half of each head (``partial_rotary_factor`` 0.5, i.e.
16 of 32 dims) and use the INTERLEAVED (GPT-J) pairing, pairs (0,1), (2,3), ...; the other five
architectures rotate the full head with the NeoX "rotate half" pairing (i, i + 16).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_rlhf.models.families.registry import FAMILIES, family_for_model_type

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN
)
"""Special tokens; the BPE trainer gives them ids 0..5 in this order."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""Jinja chat template: ``<|bos|>`` then ``<|role|>content<|eos|>`` per message."""

TINY_MAX_POSITIONS = 256
"""Context length of the tiny models, in tokens; also the tokenizer's ``model_max_length``."""

_BYTE_ALPHABET_SIZE = len(pre_tokenizers.ByteLevel.alphabet())  # 256 base byte tokens
_MIN_VOCAB_SIZE = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
_NUM_CORPUS_DOCUMENTS = 3000

# ----------------------------------------------------------------------------- synthetic corpus

_NAMES = tuple(
    "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Niaj Olivia Peggy Rupert "
    "Sybil Trent Victor Walter Zoe".split()
)
_ITEMS = tuple(
    "apples pencils books marbles cookies stickers coins cards oranges balloons tickets shells "
    "buttons candles puzzles stamps bottles".split()
)
_VERBS = tuple(
    "sort reverse count sum filter merge parse format validate normalize compress search split "
    "join average deduplicate encode".split()
)
_NOUNS = tuple(
    "list string file number table word array dictionary sentence matrix queue record message "
    "column histogram schedule inventory".split()
)


def _arithmetic_problem(rng: random.Random) -> str:
    """A two-step word problem with its worked answer."""
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    start, bought, given = rng.randint(20, 999), rng.randint(1, 999), rng.randint(1, 19)
    answer = start + bought - given
    return (
        f"{name} has {start} {item}. {name} buys {bought} more and gives {given} to {friend}. "
        f"How many {item} does {name} have now? {start} + {bought} - {given} = {answer}. "
        f"The answer is {answer}."
    )


def _python_function(rng: random.Random) -> str:
    """A small, syntactically valid python function."""
    verb, noun = rng.choice(_VERBS), rng.choice(_NOUNS)
    limit = rng.randint(2, 999)
    body = rng.choice(
        (
            f"    return sorted(values)[:{limit}]\n",
            f"    total = 0\n    for value in values:\n        total += value * {limit}\n"
            "    return total\n",
            f"    return [value for value in values if value % {limit} == 0]\n",
            f"    if len(values) > {limit}:\n        return values[::-1]\n    return values\n",
        )
    )
    return f"def {verb}_{noun}(values):\n    \"\"\"{verb.capitalize()} a {noun}.\"\"\"\n{body}"


def _chat_sentence(rng: random.Random) -> str:
    """A short user request followed by an assistant reply."""
    verb, noun = rng.choice(_VERBS), rng.choice(_NOUNS)
    greeting = rng.choice(("Hello!", "Hi there.", "Good morning.", "Hey,"))
    return (
        f"{greeting} Can you help me {verb} a {noun}? "
        f"Sure, {rng.choice(_NAMES)}. To {verb} a {noun}, start with a small example and "
        f"check each step. Is there anything else?"
    )


def synthetic_corpus(seed: int, num_documents: int = _NUM_CORPUS_DOCUMENTS) -> list[str]:
    """Deterministic mix of word problems, python functions and chat lines for ``seed``."""
    rng = random.Random(seed)
    generators = (_arithmetic_problem, _python_function, _chat_sentence)
    return [generators[index % len(generators)](rng) for index in range(num_documents)]


# ----------------------------------------------------------------------------- tokenizer


def train_tiny_tokenizer(
    vocab_size: int = 512, seed: int = 0
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of exactly ``vocab_size`` tokens on synthetic text.

    Raises:
        ValueError: if ``vocab_size`` is below the 256 byte tokens plus the special tokens, or if
            the synthetic corpus has too few distinct merges to reach it.
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE tokenizer needs at least "
            f"{_BYTE_ALPHABET_SIZE} byte tokens + {len(SPECIAL_TOKENS)} special tokens "
            f"= {_MIN_VOCAB_SIZE}"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    if bpe.get_vocab_size() != vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} not reached: the synthetic corpus (seed={seed}) only "
            f"supports {bpe.get_vocab_size()} tokens; ask for a smaller vocabulary"
        )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN],
        model_max_length=TINY_MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if len(tokenizer) != vocab_size:  # guards against a transformers version adding tokens
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, expected vocab_size={vocab_size}")
    return tokenizer


# ----------------------------------------------------------------------------- configs

SUPPORTED_TINY_ARCHITECTURES: tuple[str, ...] = tuple(family.model_types[0] for family in FAMILIES)
"""HF ``model_type`` of each family's tiny model (its ``ModelFamily.tiny_config``)."""

_ROPE_THETA = 10000.0
_SHARED_SIZES: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": TINY_MAX_POSITIONS,
    "rms_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}
"""Sizes every tiny model shares; each family adds its ``tiny_config`` on top."""


def _special_token_ids(
    tokenizer: transformers.PreTrainedTokenizerBase | None, vocab_size: int
) -> dict[str, int]:
    """bos/eos/pad ids from ``tokenizer``, or the fixed ids ``train_tiny_tokenizer`` assigns."""
    if tokenizer is None:
        return {
            "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
            "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
            "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        }
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model vocab_size is {vocab_size}"
        )
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    missing = [name for name, token_id in token_ids.items() if token_id is None]
    if missing:
        raise ValueError(f"tokenizer defines no {', '.join(missing)}")
    return token_ids


def _rope_parameters(*field_sets: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings the transformers 5 way, folding (and popping) legacy ``rope_theta`` /
    ``partial_rotary_factor`` fields and ``rope_parameters`` of each field set, later sets win."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": _ROPE_THETA}
    for fields in field_sets:
        for legacy_key in ("rope_theta", "partial_rotary_factor"):
            if legacy_key in fields:
                rope_parameters[legacy_key] = fields.pop(legacy_key)
        rope_parameters.update(fields.pop("rope_parameters", None) or {})
    return rope_parameters


def tiny_hf_config(
    architecture: str,
    vocab_size: int = 512,
    tokenizer: transformers.PreTrainedTokenizerBase | None = None,
    **overrides: Any,
) -> transformers.PretrainedConfig:
    """The transformers config of ``architecture`` at tiny size (see the module docstring).

    Args:
        architecture: an HF ``model_type`` from ``SUPPORTED_TINY_ARCHITECTURES``.
        vocab_size: embedding rows; must be >= ``len(tokenizer)`` when a tokenizer is given.
        tokenizer: source of the bos/eos/pad ids; without one the ids of
            ``train_tiny_tokenizer`` are used.
        **overrides: config fields applied last. ``rope_theta`` / ``partial_rotary_factor`` are
            folded into ``rope_parameters``.

    Raises:
        ValueError: unknown ``architecture``, or a tokenizer that does not fit ``vocab_size``.
    """
    if architecture not in SUPPORTED_TINY_ARCHITECTURES:
        raise ValueError(
            f"unknown tiny architecture {architecture!r}; supported: "
            f"{', '.join(SUPPORTED_TINY_ARCHITECTURES)}"
        )
    family_settings = dict(family_for_model_type(architecture, "tiny_hf_config").tiny_config)
    overrides = dict(overrides)
    rope_parameters = _rope_parameters(family_settings, overrides)
    config_fields = {
        **_SHARED_SIZES,
        **family_settings,
        **_special_token_ids(tokenizer, vocab_size),
        "vocab_size": vocab_size,
        "rope_parameters": rope_parameters,
        **overrides,
    }
    return transformers.AutoConfig.for_model(architecture, **config_fields)


# ----------------------------------------------------------------------------- models


def _is_norm(module: torch.nn.Module) -> bool:
    """True for LayerNorm and every model-specific RMSNorm (LlamaRMSNorm, Glm4RMSNorm, ...)."""
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


@torch.no_grad()
def perturb_norms_and_biases(model: torch.nn.Module, seed: int) -> tuple[int, int]:
    """Set every norm weight to ``1 + 0.1 * N(0, 1)`` and every bias to ``0.02 * N(0, 1)``.

    Returns:
        ``(num_norm_weights, num_biases)`` that were overwritten.
    """
    generator = torch.Generator().manual_seed(seed)
    norm_weight_names = {
        f"{name}.weight" for name, module in model.named_modules() if _is_norm(module)
    }
    num_norm_weights = num_biases = 0
    for name, parameter in model.named_parameters():  # tied parameters are visited once
        if name in norm_weight_names:
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise)
            num_norm_weights += 1
        elif name.endswith(".bias"):
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
            num_biases += 1
    return num_norm_weights, num_biases


def build_tiny_hf_model(
    config: transformers.PretrainedConfig, seed: int = 0
) -> transformers.PreTrainedModel:
    """Float32 causal LM for ``config`` with weights that depend only on ``seed``.

    The global torch RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb_norms_and_biases(model, seed)
    return model.eval()


def make_tiny_hf_model(
    architecture: str,
    out_dir: str | Path,
    seed: int = 0,
    vocab_size: int = 512,
    tokenizer: transformers.PreTrainedTokenizerBase | None = None,
    **overrides: Any,
) -> Path:
    """Build a tiny ``architecture`` model and save it, with its tokenizer, to ``out_dir``.

    Trains ``train_tiny_tokenizer(vocab_size, seed)`` when no tokenizer is given. Transformers
    5.19 always writes safetensors (``safe_serialization`` is no longer an argument), in the
    original per-expert layout described in the module docstring.

    Returns:
        ``out_dir`` as a ``Path``, holding ``config.json``, ``model.safetensors`` and the
        tokenizer files.
    """
    out_path = Path(out_dir)
    if tokenizer is None:
        tokenizer = train_tiny_tokenizer(vocab_size, seed)
    config = tiny_hf_config(architecture, vocab_size, tokenizer=tokenizer, **overrides)
    model = build_tiny_hf_model(config, seed)
    model.save_pretrained(out_path, save_original_format=True)
    tokenizer.save_pretrained(out_path)
    return out_path
