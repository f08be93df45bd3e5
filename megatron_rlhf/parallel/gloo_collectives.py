"""Megatron-Core's uneven sequence-parallel collectives, made to run over gloo.

Under tensor (or expert-tensor) parallelism with sequence parallelism, Megatron's alltoall MoE
token dispatcher all-gathers and reduce-scatters token blocks whose sizes differ by rank (each
rank routes a different number of tokens to its experts). ``megatron.core.tensor_parallel.
mappings`` does that with the list forms ``all_gather(list, tensor)`` and ``reduce_scatter(tensor,
list)``, which NCCL accepts with uneven sizes and gloo does not (gloo's allgather insists on equal
sizes). :func:`install` routes exactly those uneven calls, on gloo groups only, through the equal-
size collectives gloo has (``all_gather_into_tensor`` / ``reduce_scatter_tensor``): every block is
zero-padded to the largest, exchanged, and the padding cut off again. The results are the same
tensors (the padding rows are zeros that are never read); even-size calls and NCCL groups keep
Megatron's own code.

Guarantees: after :func:`install`, MoE layers with the alltoall dispatcher train at TP > 1 (with
sequence parallelism) over gloo. Costs: up to ``world_size * (max - min)`` extra rows per call.
"""

from __future__ import annotations

from typing import Any

import torch

_INSTALLED = False


def _is_gloo(group: Any) -> bool:
    return torch.distributed.get_backend(group) == "gloo"


def uneven_all_gather(input_: torch.Tensor, group: Any, sizes: list[int]) -> torch.Tensor:
    """Concatenation over ``group``'s ranks of blocks of ``sizes[r]`` rows (``input_`` is this
    rank's block), along the first dimension."""
    world, largest = group.size(), max(sizes)
    padded = input_.new_zeros((largest, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    gathered = input_.new_empty((world * largest, *input_.shape[1:]))
    torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
    return torch.cat([gathered[r * largest : r * largest + sizes[r]] for r in range(world)])


def uneven_reduce_scatter(input_: torch.Tensor, group: Any, sizes: list[int]) -> torch.Tensor:
    """This rank's block (``sizes[rank]`` rows) of the sum over ``group`` of ``input_``, which
    every rank holds cut into blocks of ``sizes`` rows along the first dimension."""
    world, largest = group.size(), max(sizes)
    padded = input_.new_zeros((world * largest, *input_.shape[1:]))
    for r, block in enumerate(torch.split(input_, sizes, dim=0)):
        padded[r * largest : r * largest + sizes[r]] = block
    output = input_.new_empty((largest, *input_.shape[1:]))
    torch.distributed.reduce_scatter_tensor(output, padded, group=group)
    return output[: sizes[group.rank()]]


def install() -> bool:
    """Route Megatron's uneven first-dimension gather / reduce-scatter through the functions
    above on gloo groups. Idempotent; returns whether anything was installed now."""
    global _INSTALLED
    if _INSTALLED:
        return False
    from megatron.core.tensor_parallel import mappings

    megatron_gather = mappings._gather_along_first_dim
    megatron_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or not _is_gloo(group):
            return megatron_gather(input_, group, output_split_sizes, use_global_buffer)
        return uneven_all_gather(input_, group, list(output_split_sizes))

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or not _is_gloo(group):
            return megatron_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        return uneven_reduce_scatter(input_, group, list(input_split_sizes))

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim
    _INSTALLED = True
    return True
