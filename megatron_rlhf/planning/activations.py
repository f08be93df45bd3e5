"""Activation bytes a training rank keeps for backward, per layer and per pipeline stage.

The model counts, per token and layer, the tensors Megatron-Core's GPT layer saves for backward
(measured tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` on the local layer
spec, ``tests/distributed/test_planner_exact.py``), in elements of the activation dtype:

- the two pre-sublayer RMSNorms: their input, normalised value and output, 5h in all (divided by
  TP under sequence parallelism), plus fp32 ``rstd`` per token;
- attention (flash-style, no s x s scores): the fused QKV output (nq + 2ng) d, rotated q and k
  (nq + ng) d, the attention output and the output projection's input 2 nq d, all divided by
  TP, plus the fp32 log-sum-exp per head; QK norms add (nq + ng) d / TP; GLM-4's sandwich norms
  4h;
- dense MLP: gate/up output 2f, SiLU, product and the down projection's input 3f (5f / TP);
- MoE MLP: the router's fp32 input h and logits 2E, and for each of the top-k routed copies of a
  token the permuted input and expert output 2h and 5 f_moe / ETP (an even spread of tokens over
  experts is assumed; a skewed router puts more on one rank).

Recompute: ``selective`` recomputes core attention (drops its output and log-sum-exp),
``full`` keeps only each layer's input and rebuilds one layer at a time in backward.
Pipeline: with 1F1B, stage p of PP holds min(PP - p, microbatches) microbatches in flight.
Logits: the last stage of an LM holds one microbatch's logits in the activation dtype plus fp32
copies for the log-softmax (and one more for the entropy).

Not modelled: CUDA-graph pools, allocator fragmentation (the planner's reserve covers both),
interleaved (virtual) pipeline stages. Pure arithmetic: no torch import.
"""

from __future__ import annotations

from megatron_rlhf.models.arch import ArchSpec
from megatron_rlhf.planning.layout import PlanLayout

RECOMPUTE = ("none", "selective", "full")


def _sp(layout: PlanLayout) -> int:
    return layout.tensor_parallel if layout.sequence_parallel else 1


def layer_activation_bytes(arch: ArchSpec, layout: PlanLayout, layer: int, tokens: int,
                           act_bytes: int, recompute: str = "none") -> int:
    """Bytes layer ``layer`` (global index) saves for one microbatch of ``tokens`` per rank."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} (choose from {RECOMPUTE})")
    h, d, tp, sp = arch.hidden_size, arch.head_dim, layout.tensor_parallel, _sp(layout)
    nq, ng = arch.num_attention_heads, arch.num_query_groups
    if recompute == "full":
        return tokens * h // sp * act_bytes
    norms = 5 * h / sp + (4 * h / sp if arch.post_sublayer_norms else 0)
    attention = ((nq + 2 * ng) + (nq + ng) + 2 * nq) * d / tp
    if arch.qk_layernorm:
        attention += (nq + ng) * d / tp
    fp32_extra = 4 * (2 / sp + nq / tp)
    if recompute == "selective":
        attention -= nq * d / tp
        fp32_extra -= 4 * nq / tp
    moe = arch.is_moe and arch.moe_layer_pattern is not None and arch.moe_layer_pattern[layer] == 1
    if moe:
        assert arch.moe_router_topk is not None and arch.num_experts is not None
        assert arch.moe_ffn_hidden_size is not None
        mlp = arch.moe_router_topk * (2 * h + 5 * arch.moe_ffn_hidden_size / layout.etp) / sp
        fp32_extra += 4 * (h + 2 * arch.num_experts) / sp
    else:
        mlp = 5 * arch.ffn_hidden_size / tp
    return int(tokens * ((norms + attention + mlp) * act_bytes + fp32_extra))


def logits_bytes(arch: ArchSpec, layout: PlanLayout, tokens: int, act_bytes: int,
                 entropy: bool = False, padded_vocab_size: int | None = None) -> int:
    """One microbatch's logits on a last-stage rank: act dtype + fp32 log-softmax (+ entropy)."""
    vocab = (padded_vocab_size or arch.vocab_size) // layout.tensor_parallel
    fp32_copies = 3 if entropy else 2
    return tokens * vocab * (act_bytes + 4 * fp32_copies)


def in_flight_microbatches(layout: PlanLayout, stage: int, microbatches: int) -> int:
    """Microbatches whose activations stage ``stage`` holds at once under 1F1B."""
    return max(1, min(layout.pipeline_parallel - stage, microbatches))


def stage_activation_bytes(arch: ArchSpec, layout: PlanLayout, stage: int, layers: range,
                           tokens: int, act_bytes: int, microbatches: int,
                           recompute: str = "none") -> int:
    """Saved activations of a stage at the peak of the 1F1B schedule (without logits)."""
    per_microbatch = sum(
        layer_activation_bytes(arch, layout, layer, tokens, act_bytes, recompute) for layer in layers
    )
    held = per_microbatch * in_flight_microbatches(layout, stage, microbatches)
    if recompute == "full" and len(layers):
        # backward rebuilds one layer of one microbatch at a time
        held += max(layer_activation_bytes(arch, layout, layer, tokens, act_bytes) for layer in layers)
    return held


def forward_only_bytes(arch: ArchSpec, layout: PlanLayout, layers: range, tokens: int,
                       act_bytes: int) -> int:
    """Transient activations of a no-grad forward: about one layer's worth at a time."""
    if not len(layers):
        return 0
    return max(layer_activation_bytes(arch, layout, layer, tokens, act_bytes) for layer in layers)
