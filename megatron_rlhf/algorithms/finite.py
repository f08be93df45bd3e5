"""Guards against NaN / Inf reaching advantages and losses, naming the tensor that held it.

Policy for the package (each function's docstring says which it follows):

* **Raise** -- rewards, values, log-probabilities and advantages at *response tokens* must be
  finite; a NaN there means an upstream bug (a broken reward function, an fp16 overflow) and
  silently masking it would train on garbage. :func:`check_finite` raises
  :class:`~megatron_rlhf.algorithms.errors.NonFiniteError` naming the tensor and the first bad
  position.
* **Ignore padding** -- positions where ``response_mask`` is 0 may hold anything (NaN, -inf
  log-probs of pad tokens). Functions replace them with 0 via ``torch.where`` *before* any
  arithmetic, so neither the value nor the gradient of a result can pick them up.

The check costs one device-to-host sync per call (``.item()``); loss functions let the caller
turn it off (``check_finite_inputs=False``) on a hot path once a run is known to be healthy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from megatron_rlhf.algorithms.errors import BatchShapeError, NonFiniteError


def check_finite(name: str, tensor: Tensor, mask: Tensor | None = None) -> None:
    """Raise NonFiniteError if ``tensor`` has a NaN/Inf where ``mask`` is non-zero.

    Args:
        name: what the tensor is, for the message (e.g. ``"rewards"``, ``"old_logprobs"``).
        tensor: any shape.
        mask: None (check every element) or a tensor of ``tensor``'s shape; only positions where
            it is non-zero are checked.
    """
    bad = _bad_positions(name, tensor, mask)
    if bool(bad.any()):
        _raise_first(name, tensor, bad)


def check_all_finite(tensors: Mapping[str, Tensor | None], mask: Tensor | None = None) -> None:
    """:func:`check_finite` for several named tensors of one shape with a single host sync.

    ``None`` entries are skipped. Raises for the first tensor (in mapping order) with a bad value.
    """
    present = {name: tensor for name, tensor in tensors.items() if tensor is not None}
    if not present:
        return
    bad = {name: _bad_positions(name, tensor, mask) for name, tensor in present.items()}
    any_bad = torch.stack([positions.any() for positions in bad.values()])
    if not bool(any_bad.any()):
        return
    for name, positions in bad.items():
        if bool(positions.any()):
            _raise_first(name, present[name], positions)


def _bad_positions(name: str, tensor: Tensor, mask: Tensor | None) -> Tensor:
    not_finite = ~torch.isfinite(tensor)
    if mask is None:
        return not_finite
    if mask.shape != tensor.shape:
        raise BatchShapeError(
            f"{name} has shape {tuple(tensor.shape)} but its mask has {tuple(mask.shape)}"
        )
    return not_finite & (mask != 0)


def _raise_first(name: str, tensor: Tensor, bad: Tensor) -> None:
    count = int(bad.sum())
    first = tuple(int(i) for i in bad.nonzero()[0])
    where = f"index {first[0]}" if len(first) == 1 else f"index {first}"
    raise NonFiniteError(
        f"{name} has {count} non-finite value(s) where finite values are required; "
        f"first at {where}: {tensor[first].item()}"
    )
