"""Token-budget micro-batches and packed (THD) rows: no padding inside a micro-batch.

The padded path gives every micro-batch ``micro_batch_size`` sequences right-padded to the longest
sequence of the share, so a batch of EOS-varying lengths computes many positions that are only
padding. This module plans the packed alternative; it is pure (torch tensors in, tensors out, no
process groups), so every TP/PP/CP peer of one DP replica computes the same plan from the same
share:

* :func:`token_budget_microbatches`: sample indices per micro-batch such that each micro-batch's
  real tokens (prompt + response) stay within ``max_tokens`` (first-fit decreasing; a single
  sample longer than the budget gets a micro-batch of its own), or fixed groups of
  ``micro_batch_size`` samples when no budget is given.
* :func:`pack_microbatch`: one micro-batch's sequences concatenated into one row ``[1, T]`` with
  Megatron-Core's :class:`~megatron.core.packed_seq_params.PackedSeqParams` (``qkv_format='thd'``,
  ``cu_seqlens`` per sequence), the per-sequence ``position_ids`` (restarting at 0), and the
  response read positions moved into the row. The row is padded at its tail only, to a multiple
  of what sequence/context parallelism splits (:mod:`~megatron_rlhf.models.sequence_padding`) or
  to a common length (pipeline parallelism: one activation shape per schedule call); the tail is
  its own segment in ``cu_seqlens``, so it attends only to itself and never to a real token.
* :func:`padding_fraction`: ``1 - real / computed`` positions, the metric the trainers log.

Guarantees: every sample of the share is in exactly one micro-batch; micro-batches list their
samples in increasing index order and are ordered by their first sample, so the plan is a
deterministic function of the lengths. Attention restricted to each segment (the THD contract
honoured by :class:`~megatron_rlhf.models.sdpa_attention.SDPACoreAttention` and Transformer
Engine) with positions restarting at 0 per segment makes a packed sequence's per-token outputs
those of the sequence run alone (equal up to the kernels' float summation order).

Not guaranteed: an optimal packing (first-fit decreasing is within 11/9 of the optimal number of
bins); context parallelism is not covered by the packed path (rejected by the callers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def token_budget_microbatches(lengths: Sequence[int], max_tokens: int, micro_batch_size: int) -> list[list[int]]:
    """Sample indices per micro-batch: within ``max_tokens`` real tokens each (``max_tokens > 0``),
    else consecutive groups of ``micro_batch_size`` samples (the last one may be smaller)."""
    count = len(lengths)
    if max_tokens <= 0:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        return [list(range(start, min(start + micro_batch_size, count))) for start in range(0, count, micro_batch_size)]
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in sorted(range(count), key=lambda i: (-int(lengths[i]), i)):
        length = int(lengths[index])
        target = next((b for b, load in enumerate(loads) if load + length <= max_tokens), None)
        if target is None:
            bins.append([index])
            loads.append(length)
        else:
            bins[target].append(index)
            loads[target] += length
    return sorted((sorted(members) for members in bins), key=lambda members: members[0])


def pack_microbatch(
    input_ids: Tensor,
    lengths: Tensor,
    positions: Tensor | None,
    samples: Tensor,
    multiple: int = 1,
    row_length: int | None = None,
    pad_token_id: int = 0,
    token_values: dict[str, Tensor] | None = None,
) -> dict:
    """The packed micro-batch of rows ``samples`` of ``input_ids [B, L]`` (right-padded, real
    lengths ``lengths [B]``, response read positions ``positions [B, R]`` or None).

    Returns ``input_ids [1, T]`` and ``position_ids [1, T]`` (CPU), ``packed_seq_params``,
    ``positions [b, R]`` (indices into the row; absent when ``positions`` is None),
    ``sample_index [b]`` (= ``samples``), ``real_tokens`` / ``computed_tokens`` (ints) and each of
    ``token_values`` (per-token ``[B, L]`` tensors, e.g. a loss mask) packed alike ``[1, T]``
    (0 in the tail). ``T`` is the real total rounded up to ``multiple``, or ``row_length`` when
    given (must be a multiple of ``multiple`` and fit).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_rlhf.models.sequence_padding import padded_length

    seq_lengths = [int(lengths[i]) for i in samples.tolist()]
    if min(seq_lengths, default=1) < 1:
        raise ValueError(f"packed sequences need at least one token each, got lengths {seq_lengths}")
    real = sum(seq_lengths)
    total = padded_length(real, multiple) if row_length is None else row_length
    if total < real or total % multiple:
        raise ValueError(f"row_length={total} must fit {real} tokens and be a multiple of {multiple}")
    starts = torch.tensor([0] + seq_lengths[:-1]).cumsum(0)
    pieces = [input_ids[i, :n] for i, n in zip(samples.tolist(), seq_lengths)]
    position_pieces = [torch.arange(n) for n in seq_lengths]
    boundaries = seq_lengths + ([total - real] if total > real else [])
    if total > real:  # the tail: its own segment, attending only to itself
        pieces.append(torch.full((total - real,), pad_token_id, dtype=input_ids.dtype))
        position_pieces.append(torch.arange(total - real))
    cu_seqlens = torch.tensor([0] + boundaries).cumsum(0).to(torch.int32)
    max_seqlen = max(boundaries)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    packed = {
        "input_ids": torch.cat(pieces).unsqueeze(0),
        "position_ids": torch.cat(position_pieces).unsqueeze(0),
        "packed_seq_params": params,
        "sample_index": samples,
        "real_tokens": real,
        "computed_tokens": total,
    }
    if positions is not None:
        packed["positions"] = (positions[samples] + starts.unsqueeze(1)).clamp(0, max(total - 2, 0))
    for name, values in (token_values or {}).items():
        row = torch.zeros(total, dtype=values.dtype)
        row[:real] = torch.cat([values[i, :n] for i, n in zip(samples.tolist(), seq_lengths)])
        packed[name] = row.unsqueeze(0)
    return packed


def packed_microbatches(
    input_ids: Tensor,
    lengths: Tensor,
    positions: Tensor | None,
    plan: list[list[int]],
    multiple: int = 1,
    common_length: bool = False,
    pad_token_id: int = 0,
    token_values: dict[str, Tensor] | None = None,
) -> list[dict]:
    """:func:`pack_microbatch` for each micro-batch of ``plan``; ``common_length``: every row
    padded to the longest one (pipeline parallelism needs one activation shape per call)."""
    from megatron_rlhf.models.sequence_padding import padded_length

    row_length = None
    if common_length and plan:
        row_length = max(padded_length(sum(int(lengths[i]) for i in members), multiple) for members in plan)
    return [pack_microbatch(input_ids, lengths, positions, torch.tensor(members), multiple, row_length, pad_token_id,
                            token_values)
            for members in plan]


def packed_to(microbatch: dict, device: torch.device, names: tuple[str, ...] = ("input_ids", "position_ids")) -> dict:
    """``microbatch`` with the tensors ``names`` and the ``cu_seqlens`` on ``device`` (in place)."""
    for name in names:
        microbatch[name] = microbatch[name].to(device)
    params = microbatch["packed_seq_params"]
    params.cu_seqlens_q = params.cu_seqlens_kv = params.cu_seqlens_q.to(device)
    return microbatch


def padding_fraction(real_tokens: float, computed_tokens: float) -> float:
    """``1 - real / computed`` positions (0.0 when nothing was computed)."""
    return 1.0 - real_tokens / computed_tokens if computed_tokens > 0 else 0.0
