"""Parameters that one rank of a Megatron layout holds, tensor by tensor, in module order.

:func:`stage_parameters` lists the tensors of the model a rank builds for its pipeline stage with
:mod:`megatron_rlhf.models.provider` (Megatron-Core ``GPTModel`` plus the head of its role), in the
order ``named_parameters()`` yields them, with their element counts on that rank. The counts are
exact for both layer specs (checked against the real model built on the meta device for the 9B,
32B and 235B configurations, ``tests/unit/test_planner_meta.py``); the order and the dtype of the
norm weights follow the local spec (Transformer Engine fuses the pre-attention/pre-MLP norms into
the next linear layer and keeps norm weights in the parameter dtype, which only changes the
distributed optimizer's 64-element alignment padding).

Pure arithmetic: no torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rlhf.models.arch import ArchSpec
from megatron_rlhf.planning.layout import PlanLayout, stage_layer_counts

SCALAR_ROLES = ("value", "reward", "prm")
ROLES = ("lm", *SCALAR_ROLES)


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor on one rank."""

    name: str
    """Name as in the stage model's ``named_parameters()`` (local spec)."""
    numel: int
    """Elements on this rank."""
    is_norm: bool = False
    """A norm weight (fp32 under the local spec, the parameter dtype under Transformer Engine)."""
    is_expert: bool = False
    """An expert weight: replicated over the expert-data-parallel group, not DP x CP."""
    shared_embedding: bool = False
    """A tied embedding/output weight split across pipeline stages (own optimizer bucket)."""


def padded_vocab(vocab_size: int, tensor_parallel: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary: the smallest multiple of ``divisible_by x TP``."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


def _layer(arch: ArchSpec, layout: PlanLayout, index: int, local: int) -> list[ParamTensor]:
    tp, h, d = layout.tensor_parallel, arch.hidden_size, arch.head_dim
    nq, ng = arch.num_attention_heads, arch.num_query_groups
    prefix = f"decoder.layers.{local}."
    qkv_rows = (nq + 2 * ng) * d // tp
    tensors = [
        ParamTensor(prefix + "input_layernorm.weight", h, is_norm=True),
        ParamTensor(prefix + "self_attention.linear_proj.weight", h * nq * d // tp),
        ParamTensor(prefix + "self_attention.linear_qkv.weight", qkv_rows * h),
    ]
    if arch.qkv_bias:
        tensors.append(ParamTensor(prefix + "self_attention.linear_qkv.bias", qkv_rows))
    if arch.qk_layernorm:
        tensors.append(ParamTensor(prefix + "self_attention.q_layernorm.weight", d, is_norm=True))
        tensors.append(ParamTensor(prefix + "self_attention.k_layernorm.weight", d, is_norm=True))
    if arch.post_sublayer_norms:
        tensors.append(ParamTensor(prefix + "self_attention.post_layernorm.weight", h, is_norm=True))
    tensors.append(ParamTensor(prefix + "pre_mlp_layernorm.weight", h, is_norm=True))
    moe = arch.is_moe and arch.moe_layer_pattern is not None and arch.moe_layer_pattern[index] == 1
    if moe:
        assert arch.num_experts is not None and arch.moe_ffn_hidden_size is not None
        width = arch.moe_ffn_hidden_size // layout.etp
        tensors.append(ParamTensor(prefix + "mlp.router.weight", arch.num_experts * h))
        for expert in range(arch.num_experts // layout.expert_parallel):
            name = f"{prefix}mlp.experts.local_experts.{expert}."
            tensors.append(ParamTensor(name + "linear_fc1.weight", 2 * width * h, is_expert=True))
            tensors.append(ParamTensor(name + "linear_fc2.weight", h * width, is_expert=True))
    else:
        width = arch.ffn_hidden_size // tp
        tensors.append(ParamTensor(prefix + "mlp.linear_fc1.weight", 2 * width * h))
        tensors.append(ParamTensor(prefix + "mlp.linear_fc2.weight", h * width))
    if arch.post_sublayer_norms:
        tensors.append(ParamTensor(prefix + "mlp.post_layernorm.weight", h, is_norm=True))
    return tensors


def stage_parameters(arch: ArchSpec, layout: PlanLayout, stage: int, role: str = "lm",
                     vocab_divisible_by: int = 128) -> list[ParamTensor]:
    """Parameter tensors of pipeline ``stage`` (0-based) on any of its TP/EP ranks, in order."""
    if role not in ROLES:
        raise ValueError(f"role={role!r} (choose from {ROLES})")
    counts = stage_layer_counts(arch.num_layers, layout)
    if not 0 <= stage < len(counts):
        raise ValueError(f"stage={stage} outside 0..{len(counts) - 1}")
    first, last = stage == 0, stage == len(counts) - 1
    is_lm = role == "lm"
    tied = arch.tie_word_embeddings and is_lm
    h = arch.hidden_size
    vocab_rows = padded_vocab(arch.vocab_size, layout.tensor_parallel, vocab_divisible_by) // layout.tensor_parallel
    split_tied = tied and layout.pipeline_parallel > 1
    tensors: list[ParamTensor] = []
    if first:
        tensors.append(ParamTensor("embedding.word_embeddings.weight", vocab_rows * h,
                                   shared_embedding=split_tied))
    start = sum(counts[:stage])
    for local in range(counts[stage]):
        tensors.extend(_layer(arch, layout, start + local, local))
    if last and is_lm:
        tensors.append(ParamTensor("decoder.final_layernorm.weight", h, is_norm=True))
        if not tied or split_tied:
            tensors.append(ParamTensor("output_layer.weight", vocab_rows * h, shared_embedding=split_tied))
    if last and not is_lm:
        # megatron_rlhf.models.heads.ScalarHead: its own final RMSNorm (in the parameter dtype)
        # and a hidden -> 1 projection, replicated on every TP rank.
        tensors.append(ParamTensor("head.final_layernorm.weight", h))
        tensors.append(ParamTensor("head.score.weight", h))
    return tensors


def stage_parameter_count(arch: ArchSpec, layout: PlanLayout, stage: int, role: str = "lm") -> int:
    """Elements held by one rank of ``stage``."""
    return sum(tensor.numel for tensor in stage_parameters(arch, layout, stage, role))


def total_parameter_count(arch: ArchSpec, role: str = "lm") -> int:
    """Parameters of the whole model (TP1 PP1 EP1, vocabulary padded to a multiple of 128)."""
    return stage_parameter_count(arch, PlanLayout(), 0, role)
