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
    the gradient of output row ``back[i]`` (``back[i] == len(index)``: none, a zero row then
    appended to the gradient only when ``zero_row``). Exact when every other output row holding
    source row ``i`` gets zero gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, source: Tensor, index: Tensor, back: Tensor, zero_row: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(back)
        ctx.zero_row = zero_row
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (back,) = ctx.saved_tensors
        if ctx.zero_row:
            grad = torch.cat([grad, grad.new_zeros((1,) + tuple(grad.shape[1:]))])
        return grad.index_select(0, back), None, None, None


@dataclass(frozen=True)
class RowMap:
    """A gather and its backward (:class:`RowGather`)."""

    index: Tensor
    """Output row ``r`` is source row ``index[r]``."""
    back: Tensor
    """Source row ``i`` takes output row ``back[i]``'s gradient (``len(index)``: none)."""

    @functools.cached_property
    def zero_row(self) -> bool:
        """Some source row takes no gradient."""
        return bool((self.back == self.index.numel()).any())

    def __call__(self, source: Tensor) -> Tensor:
        index = self.index.to(source.device)
        if torch.is_grad_enabled() and source.requires_grad:
            return RowGather.apply(source, index, self.back.to(source.device), self.zero_row)
        return source.index_select(0, index)


@dataclass(frozen=True)
class SegmentGroup:
    """One SDPA call: ``count`` segments right-padded to ``longest`` tokens."""

    count: int
    longest: int
    pad: RowMap
    """``[T, ...]`` packed rows -> ``[count * longest, ...]`` this group's padded batch (a segment's
    padding repeats its first token)."""
    unpad: RowMap
    """``[count * longest, ...]`` -> ``[tokens of the group, ...]``: the real tokens, in group order."""


@dataclass(frozen=True)
class PackedAttentionPlan:
    """The SDPA calls of one pack (:func:`packed_attention_plan`)."""

    groups: tuple[SegmentGroup, ...]
    order: RowMap | None
    """The groups' concatenated outputs -> packed token order (None: already so)."""

    def restore_order(self, grouped: Tensor) -> Tensor:
        """The groups' concatenated ``[T, ...]`` outputs in packed token order."""
        return grouped if self.order is None else self.order(grouped)


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
        groups.append(SegmentGroup(len(members), longest, RowMap(gather, gather_back), RowMap(keep, keep_back)))
        placed.append(gather[keep])
    placed_order = torch.cat(placed) if placed else torch.zeros(0, dtype=torch.long)
    if torch.equal(placed_order, torch.arange(placed_order.numel())):
        return PackedAttentionPlan(tuple(groups), None)
    # row r of the groups' concatenated output holds packed token placed_order[r]: token t is row
    # argsort(placed_order)[t], and row r takes token placed_order[r]'s gradient
    return PackedAttentionPlan(tuple(groups), RowMap(torch.argsort(placed_order), placed_order))
