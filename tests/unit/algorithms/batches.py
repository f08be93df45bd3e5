"""Seeded random batches for the algorithm tests, including edge cases.

Every helper takes a ``torch.Generator`` so each test is reproducible. ``lengths`` may contain 0
(empty responses); padding positions are filled with ``pad_value`` (NaN by default) so tests
catch any padding that leaks into a result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_lengths(
    generator: torch.Generator, batch: int, width: int, allow_empty: bool = True
) -> list[int]:
    low = 0 if allow_empty else 1
    return torch.randint(low, width + 1, (batch,), generator=generator).tolist()


def mask_from_lengths(lengths: list[int], width: int) -> Tensor:
    positions = torch.arange(width)
    return positions[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]


def random_tokens(
    generator: torch.Generator,
    mask: Tensor,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    pad_value: float = float("nan"),
) -> Tensor:
    values = scale * torch.randn(mask.shape, generator=generator, dtype=dtype)
    return values.masked_fill(~mask, pad_value)


def random_groups(generator: torch.Generator, batch: int, num_groups: int) -> Tensor:
    """Non-contiguous group ids (shuffled, arbitrary non-zero-based labels)."""
    labels = torch.randint(0, num_groups, (batch,), generator=generator)
    return labels * 7 + 3


def to_rows(tensor: Tensor, lengths: list[int]) -> list[list[float]]:
    return [row[:length] for row, length in zip(tensor.tolist(), lengths)]
