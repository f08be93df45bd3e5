"""GPU metrics: the model-FLOPs formula against a hand computation, the GPU peak table, and
no GPU metric at all on a machine without CUDA (never estimated)."""

from __future__ import annotations

import pytest

from megatron_rlhf.models.arch import ArchSpec
from megatron_rlhf.training.gpu_metrics import (
    GpuPhaseMonitor,
    forward_flops_per_sequence,
    peak_flops,
    training_flops,
)


def _arch(**overrides) -> ArchSpec:
    fields = dict(family="llama", model_type="llama", hf_architecture="LlamaForCausalLM", num_layers=2,
                  hidden_size=8, num_attention_heads=2, num_query_groups=1, head_dim=4, ffn_hidden_size=16,
                  vocab_size=10, max_position_embeddings=64, norm_epsilon=1e-5, rope_theta=10000.0)
    fields.update(overrides)
    return ArchSpec(**fields)


def test_dense_flops_match_a_hand_computation():
    # One sequence of 3 tokens. Per token and layer, as (rows x cols) matmuls of 2 FLOPs per MAC:
    #   q: 8x8 = 64 MACs, k: 8x4 = 32, v: 8x4 = 32, out: 8x8 = 64        -> 192 MACs
    #   gate 8x16 + up 8x16 + down 16x8 = 384 MACs                          -> 384 MACs
    # 2 layers -> 2 * 576 MACs = 1152 MACs; LM head 8x10 = 80 MACs; per token 1232 MACs = 2464 FLOPs.
    # Causal attention: token t attends to t keys: 1+2+3 = 6 pairs; per pair QK^T and AV over the
    # 8-wide queries = 16 MACs; 2 layers -> 2 * 6 * 16 = 192 MACs = 384 FLOPs.
    expected_forward = 3 * 2464 + 384
    assert forward_flops_per_sequence(_arch(), 3) == expected_forward
    assert training_flops(_arch(), [3], passes=2) == 3 * 2 * expected_forward
    assert training_flops(_arch(), [3, 3]) == 2 * 3 * expected_forward


def test_value_head_and_moe_flops():
    # A value model ends in an 8 -> 1 head (8 MACs) instead of the 8 -> 10 LM head (80 MACs).
    assert forward_flops_per_sequence(_arch(), 3) - forward_flops_per_sequence(_arch(), 3, role="value") \
        == 3 * 2 * (80 - 8)
    # MoE on layer 1 only: 4 experts of width 6, top-2. Its MLP per token: router 8x4 = 32 MACs and
    # 2 experts x (8x6 + 8x6 + 6x8) = 288 MACs, replacing the dense 384 MACs.
    moe = _arch(num_experts=4, moe_ffn_hidden_size=6, moe_router_topk=2, moe_layer_pattern=(0, 1))
    assert forward_flops_per_sequence(_arch(), 3) - forward_flops_per_sequence(moe, 3) == 3 * 2 * (384 - 320)


def test_peak_table_and_unknown_gpus():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H200", "float32") == 494e12
    assert peak_flops("Some Future GPU", "bfloat16") is None  # unknown: no MFU, not a guess


def test_no_gpu_metrics_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monitor = GpuPhaseMonitor(rank=0)
    with monitor.phase("actor_logprobs"):
        torch.ones(4).sum()
    with monitor.update("actor_update", flops_per_gpu=1e12, dtype_name="bfloat16"):
        torch.ones(4).sum()
    assert monitor.pop() == {}
