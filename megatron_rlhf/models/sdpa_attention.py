"""Core attention for the local (non-Transformer-Engine) layer spec, on torch's fused SDPA.

Megatron-Core's local spec computes core attention unfused (:class:`DotProductAttention`:
``baddbmm`` -> ``masked_fill`` -> ``softmax`` -> dropout -> ``bmm``), materialising the
``[b, heads, s, s]`` scores and probabilities. :class:`SDPACoreAttention` is a drop-in
replacement for it in ``SelfAttentionSubmodules.core_attention``: the same constructor and
``forward`` signature, the same inputs and output, computed by
``torch.nn.functional.scaled_dot_product_attention`` (the flash kernel for CPU, or whichever
kernel torch picks on the device). It holds no parameters or buffers, so state dicts and
checkpoints are the same as with Megatron's module and a model can switch between the two.
It is selected by ``ModelBuildConfig.local_attention`` (see :mod:`megatron_rlhf.models.layer_spec`).

Guarantees (matching Megatron's ``DotProductAttention`` of megatron-core 0.16):

- inputs ``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` with this rank's heads
  (``np = heads / TP``, ``ng = query groups / TP``); output ``[sq, b, np * hn]``;
- grouped-query attention: query head ``i`` attends with key/value head ``i // (np / ng)``
  (Megatron's ``repeat_interleave`` order), without materialising the repeated keys;
- softmax scale ``1 / sqrt(kv_channels)`` unless ``softmax_scale`` is given.
  ``apply_query_key_layer_scaling`` does not change the function (Megatron divides the scale by
  the layer number and multiplies it back inside an fp32 softmax), so it is not applied;
- mask: with ``attention_mask=None`` and a causal mask type, a causal mask when ``sq > 1`` (a
  single query row, as in decoding, sees every key); otherwise the given boolean mask in
  Megatron's convention (``True`` = masked out), broadcastable to ``[b, np, sq, sk]``, used on
  its own as in Megatron. The mask type given to ``forward`` is ignored, as in Megatron: the one
  given at construction counts;
- attention dropout ``config.attention_dropout`` (or the ``attention_dropout`` argument) in
  training only, drawn under Megatron's model-parallel RNG stream (``get_cuda_rng_tracker().fork()``)
  unless sequence parallelism is on, as in Megatron; none in eval.

Not guaranteed / not supported:

- the same dropout masks as Megatron's module for the same seed (the kernels draw differently);
  only the same distribution and the same RNG stream;
- bit-identical outputs: the fused kernel sums in a different order (fp32 agreement ~1e-6);
  bf16/fp16 inputs are computed by the kernel with fp32 accumulation, not an explicit fp32
  softmax as ``attention_softmax_in_fp32`` asks of Megatron's module;
- query rows whose keys are all masked out: Megatron (``masked_fill`` with -10000) returns the
  mean of all values there, SDPA returns zeros;
- rejected at construction or call with a clear error, as Megatron's module also rejects them:
  context parallelism, ``attention_bias``, sliding windows, and the ``off-by-one`` /
  ``learnable`` softmax types; packed sequences in any format but ``thd``, padded
  ``cu_seqlens_*_padded`` that differ from ``cu_seqlens_*``, or with an attention mask.

Packed sequences (``packed_seq_params.qkv_format == 'thd'``, as built by
:mod:`megatron_rlhf.models.packing`): Megatron's attention squeezes the batch dimension, so the
inputs are ``query [t, np, hn]``, ``key``/``value [t, ng, hn]`` and the output is
``[t, np * hn]``; each segment ``cu_seqlens[i]:cu_seqlens[i + 1]`` attends causally to itself
only (a block-diagonal causal mask), so a packed sequence's outputs are those of the sequence
alone. Causal segments of similar length are attended in one SDPA call on a right-padded batch
(:mod:`megatron_rlhf.models.packed_attention`); many short RL sequences then cost one kernel call
per layer instead of one each.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megatron_rlhf.models.packed_attention import packed_attention_plan


class SDPACoreAttention(MegatronModule):
    """``DotProductAttention``-compatible core attention computed by fused SDPA (see module doc)."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.utils import is_layer_window_attention
        from megatron.core.utils import divide

        self.config = config
        if config.context_parallel_size != 1:
            raise ValueError(
                f"SDPACoreAttention: context_parallel_size={config.context_parallel_size} is not "
                "supported (use the Transformer Engine spec for context parallelism)"
            )
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type != "vanilla":
            raise ValueError(f"SDPACoreAttention: softmax_type={softmax_type!r} (only 'vanilla')")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError(
                f"SDPACoreAttention: window_size={config.window_size} (sliding-window attention) "
                "is not supported; use local_attention='megatron'"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head)
            if softmax_scale is None
            else softmax_scale
        )
        self.dropout_p = float(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        """``[sq, b, np * hn]`` attention output of this rank's heads (see module docstring)."""
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention: attention_bias is not supported")
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, attention_mask, packed_seq_params)
        sq, batch, heads, _ = query.shape
        sk = key.shape[0]
        is_causal = False
        sdpa_mask = None
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"SDPACoreAttention: attention_mask must be boolean (True = masked out, "
                    f"Megatron's convention), got dtype {attention_mask.dtype}"
                )
            sdpa_mask = attention_mask.logical_not()
        elif self._is_causal_type() and sq > 1:
            if sq != sk:
                raise ValueError(
                    f"SDPACoreAttention: a causal mask needs as many queries as keys, got "
                    f"sq={sq}, sk={sk}"
                )
            is_causal = True
        dropout_p = self.dropout_p if self.training else 0.0
        context = self._attend(query, key, value, sdpa_mask, is_causal, dropout_p)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, heads * context.shape[-1])

    def _forward_packed(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                        params: Any) -> Tensor:
        """``[t, np * hn]``: causal attention within each ``thd`` segment (module docstring)."""
        if params.qkv_format != "thd":
            raise ValueError(f"SDPACoreAttention: packed qkv_format={params.qkv_format!r} (only 'thd')")
        if attention_mask is not None:
            raise ValueError("SDPACoreAttention: packed (thd) sequences take no attention_mask")
        cu_seqlens = params.cu_seqlens_q
        for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            padded = getattr(params, name, None)
            if padded is not None and not torch.equal(padded.cpu(), cu_seqlens.cpu()):
                raise ValueError(f"SDPACoreAttention: {name} differs from cu_seqlens_q (not supported)")
        if not torch.equal(params.cu_seqlens_kv.cpu(), cu_seqlens.cpu()):
            raise ValueError("SDPACoreAttention: packed self-attention needs cu_seqlens_kv == cu_seqlens_q")
        if query.dim() != 3 or int(cu_seqlens[-1]) != query.shape[0]:
            raise ValueError(f"SDPACoreAttention: thd query {tuple(query.shape)} does not match "
                             f"cu_seqlens ending at {int(cu_seqlens[-1])}")
        causal = self._is_causal_type()
        dropout_p = self.dropout_p if self.training else 0.0
        plan = packed_attention_plan(tuple(cu_seqlens.tolist()), batched=causal)
        width, contexts = query.shape[-1], []
        for group in plan.groups:
            # [n * longest] gathered tokens -> [longest, n, heads, d]; output [n, heads, longest, d]
            padded = (group.pad(tensor).view(group.count, group.longest, tensor.shape[1], width).transpose(0, 1)
                      for tensor in (query, key, value))
            context = self._attend(*padded, None, causal and group.longest > 1, dropout_p)
            contexts.append(group.unpad(context.permute(0, 2, 1, 3).reshape(group.count * group.longest, -1)))
        return plan.restore_order(torch.cat(contexts) if len(contexts) > 1 else contexts[0])

    def _is_causal_type(self) -> bool:
        from megatron.core.transformer.enums import AttnMaskType

        return self.attn_mask_type == AttnMaskType.causal

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        sdpa_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
    ) -> Tensor:
        """SDPA on ``[s, b, heads, d]`` inputs; ``[b, heads, sq, d]`` output."""
        from torch.nn.functional import scaled_dot_product_attention

        def attend() -> Tensor:
            return scaled_dot_product_attention(
                query.permute(1, 2, 0, 3),
                key.permute(1, 2, 0, 3),
                value.permute(1, 2, 0, 3),
                attn_mask=sdpa_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=key.shape[2] != query.shape[2],
            )

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attend()
        return attend()
