"""The ``response_mask`` convention and the layout helpers built on it.

Convention for every token-level tensor in this package: shape ``[B, T]`` over *response* tokens
(prompt tokens are not in T), right-padded, with ``response_mask`` ``[B, T]`` equal to 1 at real
response tokens and 0 at padding. A row of zeros is an empty response. Masks may be bool or any
numeric dtype; positions are "real" where the mask is non-zero.

Sequence-level tensors are ``[B]``. The sequence reward of a response is credited at its last
response token (:func:`place_at_last_token`), the usual RLHF convention (Ziegler et al. 2019;
Ouyang et al. 2022).

Only :func:`check_response_mask` checks the values of a mask (0/1, right-padded), which costs a
host sync; the other helpers only check shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rlhf.algorithms.errors import BatchShapeError


def as_bool_mask(response_mask: Tensor, name: str = "response_mask") -> Tensor:
    """``response_mask`` as a ``[B, T]`` bool tensor (non-zero = response token)."""
    if response_mask.dim() != 2:
        raise BatchShapeError(f"{name} must be [B, T]; got shape {tuple(response_mask.shape)}")
    return response_mask if response_mask.dtype == torch.bool else response_mask != 0


def check_token_shapes(mask: Tensor, **tensors: Tensor | None) -> None:
    """Raise BatchShapeError unless every given tensor has the mask's ``[B, T]`` shape."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != mask.shape:
            raise BatchShapeError(
                f"{name} has shape {tuple(tensor.shape)}; expected {tuple(mask.shape)} "
                "like response_mask"
            )


def check_sequence_shape(batch_size: int, **tensors: Tensor | None) -> None:
    """Raise BatchShapeError unless every given tensor is ``[batch_size]``."""
    for name, tensor in tensors.items():
        if tensor is not None and tuple(tensor.shape) != (batch_size,):
            raise BatchShapeError(
                f"{name} has shape {tuple(tensor.shape)}; expected [{batch_size}] (one per sample)"
            )


def check_response_mask(response_mask: Tensor) -> None:
    """Validate the values of a mask: 2-D, only 0/1, right-padded (no 1 after a 0 in a row)."""
    mask = as_bool_mask(response_mask)
    if response_mask.dtype != torch.bool:
        not_binary = (response_mask != 0) & (response_mask != 1)
        if bool(not_binary.any()):
            row, col = (int(i) for i in not_binary.nonzero()[0])
            raise BatchShapeError(
                f"response_mask must hold only 0/1; got {response_mask[row, col].item()} at "
                f"[{row}, {col}]"
            )
    gap_then_token = (~mask[:, :-1]) & mask[:, 1:]
    if bool(gap_then_token.any()):
        row, col = (int(i) for i in gap_then_token.nonzero()[0])
        raise BatchShapeError(
            f"response_mask must be right-padded; row {row} has a 0 at position {col} followed "
            f"by a 1 at position {col + 1}"
        )


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """Float dtype for the math: the inputs' promoted dtype, at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def zero_padding(values: Tensor, mask: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``values`` (cast to ``dtype``) with every non-response position set to exactly 0.

    Uses ``torch.where``, so NaN/Inf at padding vanish and their gradient is exactly 0.
    """
    values = values.to(dtype) if dtype is not None else values
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def last_token_onehot(response_mask: Tensor) -> Tensor:
    """``[B, T]`` bool, True only at the last response token of each row (none if empty)."""
    mask = as_bool_mask(response_mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
    return (positions == last) & mask


def place_at_last_token(sequence_values: Tensor, response_mask: Tensor) -> Tensor:
    """``[B]`` sequence values to ``[B, T]``: each at its last response token, 0 elsewhere.

    An empty response (all-zero mask row) gets no value anywhere: its row is all zeros.
    """
    mask = as_bool_mask(response_mask)
    check_sequence_shape(mask.shape[0], sequence_values=sequence_values)
    onehot = last_token_onehot(mask)
    dtype = compute_dtype(sequence_values)
    return zero_padding(sequence_values.to(dtype)[:, None].expand_as(onehot), onehot)


def broadcast_to_tokens(sequence_values: Tensor, response_mask: Tensor) -> Tensor:
    """Spread ``[B]`` sequence values to every response token of their row (0 at padding)."""
    mask = as_bool_mask(response_mask)
    check_sequence_shape(mask.shape[0], sequence_values=sequence_values)
    dtype = compute_dtype(sequence_values)
    return zero_padding(sequence_values.to(dtype)[:, None].expand_as(mask), mask)
