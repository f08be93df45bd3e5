"""The language-model head at chosen positions only: logits where a loss or a log-prob reads them.

An RL pass reads the policy's log-probs at the response tokens only, yet Megatron's ``GPTModel``
runs its output layer (``hidden -> vocab``, often the largest matmul of the model) and the
caller's log-softmax at every position, prompts and padding included. :func:`logits_at` wraps one
forward of a ``GPTModel`` (on its last pipeline stage) so that the output layer receives only the
final hidden states at ``positions``: the model then returns logits ``[b, R, V / TP]`` with
``logits[i, r]`` the logits at position ``positions[i, r]`` of row ``rows[i]`` (``rows`` is
``range(b)`` for right-padded microbatches, 0 for a packed row that holds ``b`` sequences).

Guarantees: the selected logits equal the full forward's logits at those positions up to the
matmul's summation order (the same weights, the same final norm, a smaller matrix); gradients
reach the hidden states of the selected positions only, as the full forward's loss at those
positions gives them. Under sequence parallelism the hidden states are gathered over the TP group
first (backward: each rank keeps its part of the gradient, which the output layer has already
all-reduced) and the output layer runs that one call without its sequence-parallel gather, as
Megatron's own inference path does for the last-token logits. The layer's attribute is restored
when the forward ends, also on error. Not with multi-token prediction (``mtp``): refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


@contextlib.contextmanager
def logits_at(trunk: Any, positions: Tensor, rows: Tensor) -> Iterator[None]:
    """While inside, ``trunk`` (a last-stage ``GPTModel``) computes logits at ``positions`` only
    (``[b, R]`` long; ``rows`` ``[b, 1]`` long, the row of each line of ``positions``)."""
    if getattr(trunk, "mtp_process", False):
        raise ValueError("logits at chosen positions do not cover multi-token prediction (mtp)")
    layer = trunk.output_layer
    sequence_parallel = layer.sequence_parallel
    handle = layer.register_forward_pre_hook(_selecting_hook(positions, rows, sequence_parallel), with_kwargs=True)
    layer.sequence_parallel = False
    try:
        yield
    finally:
        handle.remove()
        layer.sequence_parallel = sequence_parallel


def _selecting_hook(positions: Tensor, rows: Tensor, sequence_parallel: bool):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0]  # [s (/ TP under SP), batch rows, hidden]
        if sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=module.tp_group)
        device = hidden.device
        selected = hidden[positions.to(device), rows.to(device)]  # [b, R, hidden]
        return (selected.transpose(0, 1).contiguous(), *args[1:]), kwargs

    return hook


def rows_of(positions: Tensor, packed: bool) -> Tensor:
    """``[b, 1]`` the microbatch row each line of ``positions`` reads: its own, or the packed row 0."""
    count = positions.shape[0]
    return torch.zeros((count, 1), dtype=torch.long) if packed else torch.arange(count).unsqueeze(1)


def next_tokens(input_ids: Tensor, positions: Tensor, packed: bool) -> Tensor:
    """``[b, R]`` the token each selected position predicts (``input_ids`` at ``position + 1`` of
    its row; clamped into the row, where only masked-out response slots land)."""
    following = (positions.to(input_ids.device) + 1).clamp(max=input_ids.shape[1] - 1)
    if packed:
        return input_ids[0][following]
    return input_ids.gather(1, following)
