"""Context parallelism: the load-balanced split of a sequence over CP ranks, and its inverse.

With causal attention, the later tokens of a sequence attend to more keys, so cutting the
sequence into CP contiguous pieces would leave the last rank with most of the work. As in
Megatron-Core, the sequence is cut into ``2 * cp`` equal chunks and CP rank ``r`` takes chunks
``r`` and ``2 * cp - 1 - r`` (one early, one late): every rank gets the same attention work.
Megatron's CP attention (Transformer Engine's ring attention) expects exactly this layout.

* :func:`context_parallel_split` -- this rank's part of a ``[.., T, ..]`` tensor (``T`` a
  multiple of ``2 * cp``; :func:`padded_length` rounds up).
* :func:`context_parallel_merge` -- the inverse: the parts of all CP ranks, in rank order,
  back into the original order.
* :func:`split_microbatch` / :func:`gather_output` -- the two ends of a forward pass under CP
  (used by :func:`megatron_rlhf.models.forward.run_microbatch`): positions are the global ones,
  and the last stage's per-token output is all-gathered over the CP group (differentiably) and
  merged, so log-probs and losses are computed on whole sequences.

Guaranteed (pure parts, tested on CPU): merge(split(x, r) for r in ranks) == x for any cp.
Not available on CPU: the CP forward itself needs CUDA and Transformer Engine attention, and
:func:`megatron_rlhf.models.provider.validate_layout` refuses context_parallel > 1 there.
"""

from __future__ import annotations

from typing import Sequence

import torch


def padded_length(length: int, cp_size: int) -> int:
    """``length`` rounded up to a multiple of ``2 * cp_size``."""
    chunks = 2 * cp_size
    return -(-length // chunks) * chunks


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two of ``2 * cp_size`` sequence chunks that CP rank ``cp_rank`` holds."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} outside 0..{cp_size - 1}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def context_parallel_split(tensor: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's part (``T / cp`` positions along ``dim``) of ``tensor``."""
    if cp_size == 1:
        return tensor
    length = tensor.shape[dim]
    if length % (2 * cp_size):
        raise ValueError(f"sequence length {length} is not a multiple of 2 * context_parallel = {2 * cp_size}")
    chunks = tensor.chunk(2 * cp_size, dim=dim)
    early, late = chunk_ids(cp_size, cp_rank)
    return torch.cat([chunks[early], chunks[late]], dim=dim)


def context_parallel_merge(parts: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`context_parallel_split`: every CP rank's part, in rank order."""
    cp_size = len(parts)
    if cp_size == 1:
        return parts[0]
    ordered: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        if part.shape[dim] % 2:
            raise ValueError(f"CP rank {rank}'s part has odd length {part.shape[dim]} along dim {dim}")
        early, late = chunk_ids(cp_size, rank)
        ordered[early], ordered[late] = part.chunk(2, dim=dim)
    return torch.cat(ordered, dim=dim)  # type: ignore[arg-type]


def split_microbatch(microbatch: dict[str, torch.Tensor], cp_size: int, cp_rank: int,
                     pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(input_ids, position_ids, original length)`` of this CP rank (right-padded to a
    multiple of ``2 * cp``; the padding comes after every real token, so causal outputs of real
    tokens do not change)."""
    input_ids = microbatch["input_ids"]
    length = input_ids.shape[1]
    positions = microbatch.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    extra = padded_length(length, cp_size) - length
    if extra:
        input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=pad_token_id)
        last = positions[:, -1:] + torch.arange(1, extra + 1, device=positions.device)
        positions = torch.cat([positions, last], dim=1)
    return (context_parallel_split(input_ids, cp_size, cp_rank),
            context_parallel_split(positions, cp_size, cp_rank), length)


def gather_output(output: torch.Tensor, length: int, group) -> torch.Tensor:
    """The whole-sequence ``[B, T, ...]`` output from this rank's part (autograd-aware gather)."""
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(output.contiguous(), group=group)
    return context_parallel_merge(list(parts), dim=1)[:, :length]
