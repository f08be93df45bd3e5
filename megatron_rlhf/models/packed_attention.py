"""Causal attention over a ``thd`` pack in few kernel calls: segments batched by length.

A packed micro-batch (:mod:`megatron_rlhf.models.packing`) is one row of several sequences,
``cu_seqlens`` marking them; each must attend causally to itself only. One SDPA call per segment
is exact but costs a kernel call (and its backward) per sequence and layer: with many short RL
responses that overhead dominated the local spec's packed passes on CPU. Here segments of similar
length (:func:`segment_groups`) are gathered into one right-padded ``[n, longest]`` batch and
attended in one causal call.

Guarantees:

- exact: in a causal call a real token's row only sees keys at or before it, all real tokens of
  its own segment; a segment's padding (a copy of its first token) is never attended by a real
  token and its outputs are dropped, so the outputs are each segment's alone, and the padding
  positions receive exactly zero gradient;
- the backward pass is gathers only (:class:`RowGather`): the gradient of a gathered row flows
  back from the one position that holds it as a real token (the others carry zero gradient, as
  just said), never through a scatter-add over repeated indices (measured: CPU ``scatter_add_``
  was 8% of a d256 update);
- non-causal attention is never batched (``batched=False``: one segment per call), since there a
  real token would see its segment's padding;
- a group computes at most ``padding_ratio`` times its segments' own attention positions, plus
  :data:`SEGMENT_CALL_POSITIONS` per segment for the calls it saves.

Plans are cached per ``cu_seqlens`` (every layer of a micro-batch shares them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

SEGMENT_CALL_POSITIONS = 64 * 64
"""Attention positions (query x key) one SDPA call costs on its own, as a padding allowance: a
segment this short always joins a group, whatever padding that adds."""


def segment_groups(lengths: list[int], padding_ratio: float = 1.25) -> list[list[int]]:
    """Packed segments (their indices) batched into one SDPA call each.

    Segments are taken longest first; one joins the current group (longest ``M``) while
    ``M**2 <= padding_ratio * L**2 + SEGMENT_CALL_POSITIONS``, so a group computes at most
    ``padding_ratio`` times its segments' own attention positions plus the cost of the calls it
    saves. Many short segments (RL responses) become one call instead of one each; long segments
    of different lengths keep their own calls (no quadratic padding). Every index appears exactly
    once; zero-length segments are left out."""
    if padding_ratio < 1.0:
        raise ValueError(f"segment_groups: padding_ratio={padding_ratio} must be >= 1")
    groups: list[list[int]] = []
    longest = 0
    for index in sorted((i for i, length in enumerate(lengths) if length > 0), key=lambda i: -lengths[i]):
        length = lengths[index]
        if groups and longest * longest <= padding_ratio * length * length + SEGMENT_CALL_POSITIONS:
            groups[-1].append(index)
        else:
            groups.append([index])
            longest = length
    return groups


class RowGather(torch.autograd.Function):
    """``source.index_select(0, index)`` whose backward is a gather too: source row ``i`` takes
    the gradient of output row ``back[i]`` (``back[i] == len(index)``: none). Exact when every
    other output row holding source row ``i`` gets zero gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, source: Tensor, index: Tensor, back: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(back)
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (back,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros((1,) + tuple(grad.shape[1:]))])
        return padded.index_select(0, back), None, None


def _gather(source: Tensor, index: Tensor, back: Tensor) -> Tensor:
    index, back = index.to(source.device), back.to(source.device)
    if torch.is_grad_enabled() and source.requires_grad:
        return RowGather.apply(source, index, back)
    return source.index_select(0, index)


@dataclass(frozen=True)
class SegmentGroup:
    """One SDPA call: ``count`` segments right-padded to ``longest`` tokens."""

    count: int
    longest: int
    gather: Tensor
    """``[count * longest]``: the packed token at each position of the padded batch."""
    gather_back: Tensor
    """``[T]``: each packed token's position in the padded batch (``count * longest``: not here)."""
    keep: Tensor
    """``[tokens of the group]``: the padded batch's positions of real tokens, in group order."""
    keep_back: Tensor
    """``[count * longest]``: each padded position's row in the kept output (len(keep): padding)."""

    def pad(self, packed: Tensor) -> Tensor:
        """``[T, ...]`` packed rows -> ``[count * longest, ...]`` this group's padded batch."""
        return _gather(packed, self.gather, self.gather_back)

    def unpad(self, padded: Tensor) -> Tensor:
        """``[count * longest, ...]`` -> ``[tokens of the group, ...]`` (padding dropped)."""
        return _gather(padded, self.keep, self.keep_back)


@dataclass(frozen=True)
class PackedAttentionPlan:
    groups: tuple[SegmentGroup, ...]
    order: Tensor | None
    """Rows of the groups' concatenated outputs in packed order (None: already so)."""
    order_back: Tensor | None

    def restore_order(self, grouped: Tensor) -> Tensor:
        """The groups' concatenated ``[T, ...]`` outputs in packed token order."""
        return grouped if self.order is None else _gather(grouped, self.order, self.order_back)


@functools.lru_cache(maxsize=32)
def packed_attention_plan(bounds: tuple[int, ...], batched: bool = True) -> PackedAttentionPlan:
    """The plan for a pack with ``cu_seqlens`` ``bounds``: :func:`segment_groups` groups when
    ``batched`` (causal attention), else one segment per group."""
    starts, lengths = bounds[:-1], [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    total = bounds[-1] if bounds else 0
    grouping = segment_groups(lengths) if batched else [[i] for i, length in enumerate(lengths) if length > 0]
    groups, placed = [], []
    for members in grouping:
        longest = max(lengths[i] for i in members)
        offsets = torch.arange(longest)
        index = torch.tensor([starts[i] for i in members]).unsqueeze(1) + offsets.unsqueeze(0)
        real = (offsets.unsqueeze(0) < torch.tensor([lengths[i] for i in members]).unsqueeze(1)).reshape(-1)
        gather = torch.where(real.view(len(members), longest), index, index[:, :1]).reshape(-1)
        keep = real.nonzero().squeeze(1)
        size = len(members) * longest
        gather_back = torch.full((total,), size, dtype=torch.long)
        gather_back[gather[keep]] = keep
        keep_back = torch.full((size,), keep.numel(), dtype=torch.long)
        keep_back[keep] = torch.arange(keep.numel())
        groups.append(SegmentGroup(len(members), longest, gather, gather_back, keep, keep_back))
        placed.append(gather[keep])
    placed_order = torch.cat(placed) if placed else torch.zeros(0, dtype=torch.long)
    if torch.equal(placed_order, torch.arange(placed_order.numel())):
        return PackedAttentionPlan(tuple(groups), None, None)
    # row r of the groups' concatenated output holds packed token placed_order[r]: token t is row
    # argsort(placed_order)[t], and row r takes token placed_order[r]'s gradient
    return PackedAttentionPlan(tuple(groups), torch.argsort(placed_order), placed_order)
