"""Collectives over the pipeline-parallel group that every trainer needs.

Megatron's schedules leave loss and output tensors on the last pipeline stage only; the
functions here give every stage the last stage's result, so a caller on any rank sees the same
values. Guarantees: with PP = 1 they return their input untouched (no collective); they must be
called by every rank of the pipeline group with tensors of one shape and dtype (a collective).
"""

from __future__ import annotations

import torch


def broadcast_from_last_stage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as the last pipeline stage holds it, on every stage (same shape everywhere).

    Use the returned tensor: a non-contiguous input is broadcast into a contiguous copy.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    if group.size() > 1:
        tensor = tensor.contiguous()
        last = torch.distributed.get_global_rank(group, group.size() - 1)
        torch.distributed.broadcast(tensor, src=last, group=group)
    return tensor
