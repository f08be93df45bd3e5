"""Tensor transforms of the weight rules: combine, split, shard and pad full tensors.

A :class:`~megatron_rlhf.models.families.weight_rules.WeightRule` (defined with the model
families, as a name template) says which HF tensors make one Megatron parameter, how they
combine (``copy``, fused ``qkv``, fused ``glu`` gate/up) and how the full tensor is split over
tensor-parallel ranks. The transforms here are pure functions on full (unsharded) tensors;
:mod:`megatron_rlhf.mapping.engine` applies them to live models.

Guarantee: ``to_hf(rule, to_megatron(rule, tensors)) == tensors`` bit for bit and
``unshard(rule, [shard(rule, t, r, n) for r in range(n)]) == t`` for every rule.
"""

from __future__ import annotations

import torch

from megatron_rlhf.models.arch_spec import ArchSpec
from megatron_rlhf.models.families.weight_rules import WeightRule

__all__ = ["WeightRule", "pad_vocab", "shard", "to_hf", "to_megatron", "unshard"]


def to_megatron(rule: WeightRule, hf_tensors: list[torch.Tensor], arch: ArchSpec) -> torch.Tensor:
    """Combine HF tensors into the full Megatron tensor (before vocab padding)."""
    if rule.combine == "copy":
        return hf_tensors[0]
    if rule.combine == "glu":
        gate, up = hf_tensors
        return torch.cat([gate, up], dim=0)
    query, key, value = hf_tensors
    groups, per_group, head_dim = arch.num_query_groups, arch.queries_per_group, arch.head_dim
    trailing = query.shape[1:]
    fused = torch.cat(
        [
            query.reshape(groups, per_group * head_dim, *trailing),
            key.reshape(groups, head_dim, *trailing),
            value.reshape(groups, head_dim, *trailing),
        ],
        dim=1,
    )
    return fused.reshape(groups * (per_group + 2) * head_dim, *trailing)


def to_hf(rule: WeightRule, megatron_tensor: torch.Tensor, arch: ArchSpec) -> list[torch.Tensor]:
    """Split a full Megatron tensor into its HF tensors (after vocab padding is removed)."""
    if rule.combine == "copy":
        return [megatron_tensor]
    if rule.combine == "glu":
        gate, up = torch.chunk(megatron_tensor, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]
    groups, per_group, head_dim = arch.num_query_groups, arch.queries_per_group, arch.head_dim
    trailing = megatron_tensor.shape[1:]
    grouped = megatron_tensor.reshape(groups, (per_group + 2) * head_dim, *trailing)
    query, key, value = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return [
        query.reshape(groups * per_group * head_dim, *trailing).contiguous(),
        key.reshape(groups * head_dim, *trailing).contiguous(),
        value.reshape(groups * head_dim, *trailing).contiguous(),
    ]


def shard(rule: WeightRule, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's part of a full Megatron tensor."""
    if rule.split == "replicated" or size == 1:
        return full
    if rule.split == "column":
        return torch.chunk(full, size, dim=0)[rank]
    if rule.split == "row":
        return torch.chunk(full, size, dim=1)[rank]
    gate, up = torch.chunk(full, 2, dim=0)
    return torch.cat([torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]])


def unshard(rule: WeightRule, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every TP rank's part, in rank order."""
    if rule.split == "replicated" or len(shards) == 1:
        return shards[0]
    if rule.split == "column":
        return torch.cat(shards, dim=0)
    if rule.split == "row":
        return torch.cat(shards, dim=1)
    halves = [torch.chunk(part, 2, dim=0) for part in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def pad_vocab(tensor: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows up to ``padded_rows``."""
    missing = padded_rows - tensor.shape[0]
    if missing < 0:
        raise ValueError(f"tensor has {tensor.shape[0]} rows, more than padded {padded_rows}")
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((missing, *tensor.shape[1:]))], dim=0)
