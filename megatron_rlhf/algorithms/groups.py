"""Per-group statistics of sequence-level values, for GRPO/RLOO baselines and reward normalisation.

A *group* is the ``n`` responses sampled for one prompt. Layout: ``group_index`` ``[B]`` int64
says which prompt each sample belongs to. Ids are arbitrary integers (not necessarily 0..G-1) and
samples of a group need not be contiguous or equally many. The common contiguous layout
``[prompt0 x n, prompt1 x n, ...]`` is :func:`contiguous_group_index`.

Conventions (used by every caller in this package):

* **std is the unbiased sample std** (divide by ``n - 1``), as ``torch.std`` and the GRPO
  implementations of OpenRLHF and verl compute it. A group of one sample has std defined as 0.
* Deviations ``r_i - mean_group`` are computed after shifting by the group maximum, so a group of
  identical values has deviations and std of *exactly* 0 (no rounding residue that a division by
  a tiny ``eps`` would blow up), and single-sample groups have deviation exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rlhf.algorithms.errors import BatchShapeError
from megatron_rlhf.algorithms.masks import compute_dtype


def contiguous_group_index(
    num_prompts: int, group_size: int, device: torch.device | str | None = None
) -> Tensor:
    """``[num_prompts * group_size]`` int64 group ids for the contiguous layout.

    Sample ``i`` belongs to prompt ``i // group_size``: ``[0]*n + [1]*n + ...``.
    """
    if num_prompts < 0:
        raise BatchShapeError(f"num_prompts must be >= 0; got {num_prompts}")
    if group_size < 1:
        raise BatchShapeError(f"group_size must be >= 1; got {group_size}")
    return torch.arange(num_prompts, device=device).repeat_interleave(group_size)


@dataclass(frozen=True)
class GroupMoments:
    """Statistics of each sample's group, broadcast back to the samples (all ``[B]``)."""

    deviation: Tensor
    """``[B]`` ``value_i - mean(group of i)``; exactly 0 for constant and single-sample groups."""
    mean: Tensor
    """``[B]`` mean of the group of sample i."""
    std: Tensor
    """``[B]`` unbiased (n - 1) std of the group of sample i; 0 for single-sample groups."""
    count: Tensor
    """``[B]`` int64 number of samples in the group of sample i."""


def check_group_index(group_index: Tensor, batch_size: int, name: str = "group_index") -> None:
    """Raise BatchShapeError unless ``group_index`` is an integer ``[batch_size]`` tensor."""
    if tuple(group_index.shape) != (batch_size,):
        raise BatchShapeError(
            f"{name} has shape {tuple(group_index.shape)}; expected [{batch_size}] "
            "(one id per sample)"
        )
    if group_index.is_floating_point() or group_index.dtype == torch.bool:
        raise BatchShapeError(f"{name} must be an integer tensor; got {group_index.dtype}")


def group_moments(values: Tensor, group_index: Tensor) -> GroupMoments:
    """Mean, unbiased std and deviation of ``values`` ``[B]`` within the groups of ``group_index``.

    Runs in the inputs' float dtype (at least float32). ``values`` must be finite (callers check).
    """
    if values.dim() != 1:
        raise BatchShapeError(f"values must be [B]; got shape {tuple(values.shape)}")
    check_group_index(group_index, values.shape[0])
    values = values.to(compute_dtype(values))
    if values.numel() == 0:
        empty = values.new_zeros(0)
        return GroupMoments(empty, empty, empty, group_index.new_zeros(0, dtype=torch.long))
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    counts = torch.bincount(inverse, minlength=num_groups)
    shift = values.new_full((num_groups,), float("-inf")).scatter_reduce(
        0, inverse, values, reduce="amax"
    )
    centered = values - shift[inverse]
    centered_mean = values.new_zeros(num_groups).index_add(0, inverse, centered) / counts
    deviation = centered - centered_mean[inverse]
    squares = values.new_zeros(num_groups).index_add(0, inverse, deviation * deviation)
    variance = torch.where(
        counts > 1, squares / (counts - 1).clamp(min=1), torch.zeros_like(squares)
    )
    mean = shift + centered_mean
    return GroupMoments(
        deviation=deviation,
        mean=mean[inverse],
        std=variance.sqrt()[inverse],
        count=counts[inverse],
    )


def batch_moments(values: Tensor) -> GroupMoments:
    """:func:`group_moments` with the whole batch as one group."""
    return group_moments(
        values, torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
    )
