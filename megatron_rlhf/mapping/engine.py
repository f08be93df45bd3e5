"""Apply the weight rules to a live, sharded Megatron model: HF in, HF out.

- :func:`load_hf_weights`: every rank fills its own shards from an HF checkpoint, reading only the
  tensors its parameters are made of. Every parameter of the stage must be covered by a rule and
  every shape must match, else :class:`WeightMappingError` names the parameter.
- :func:`export_hf_weights`: yields ``(hf_name, full_tensor)`` for the whole model, in the global
  order of :func:`megatron_rlhf.mapping.registry.expand_rules`, on every rank. Each tensor is
  gathered over its tensor-parallel (or expert-tensor-parallel) group by the ranks that own it,
  then broadcast over the expert-parallel and pipeline groups, so that at most one full
  parameter is materialised at a time (plus its shards). All ranks must iterate to the end.
  A yielded tensor may share storage with a live parameter (replicated parameters, TP1):
  clone it to keep it across an optimizer step.
  With ``only_rank0=True`` (the weight sync, where only global rank 0 sends) each tensor is
  gathered onto global rank 0 alone: the TP (or expert-TP) group of the one owning replica in
  rank 0's data-parallel column gathers onto its TP rank 0, which sends it to rank 0 (point to
  point); every other rank yields a ``meta`` tensor of the same name, shape and dtype (no
  memory, no copy), so all ranks still iterate the same stream. Only a small header (which
  rank sends, shape, dtype) is agreed per tensor, on the first export of a model only: it never
  changes for a model object, so later exports (every weight sync) reuse it and move nothing
  but the tensors; a one-rank world agrees nothing at all.

Used by the checkpoint converters and, later, by weight sync into vLLM.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from megatron_rlhf.mapping.registry import PlacedRule, expand_rules
from megatron_rlhf.mapping.rules import pad_vocab, shard, to_hf, to_megatron, unshard
from megatron_rlhf.models.arch import ArchSpec
from megatron_rlhf.models.layer_spec import canonical_name
from megatron_rlhf.parallel.megatron_compat import global_layer_index

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


class WeightMappingError(ValueError):
    """A parameter and its mapping disagree (missing rule, missing tensor, shape mismatch)."""


@dataclass(frozen=True)
class LocalParameter:
    global_name: str
    """Canonical Megatron name with global layer and expert indices."""
    parameter: torch.nn.Parameter


def _strip_wrappers(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def model_transformer_impl(model: torch.nn.Module, impl: str | None = None) -> str:
    """The layer spec ``model`` was built with (carried by its RoleModel, inside any wrappers).

    ``impl``, when given, must agree with it: names read through another spec would not match.
    A module that carries no choice (not a RoleModel) is read with the local spec.
    """
    carried = None
    wrapped: Any = model
    while wrapped is not None and carried is None:
        carried = getattr(wrapped, "transformer_impl", None)
        wrapped = getattr(wrapped, "module", None)
    if impl is not None and carried is not None and impl != carried:
        raise WeightMappingError(
            f"impl={impl!r} asked for a model built with the {carried!r} layer spec; its parameter "
            "names follow the spec it was built with"
        )
    return carried or impl or "local"


def local_parameters(model: torch.nn.Module, impl: str | None = None) -> dict[str, LocalParameter]:
    """This stage's parameters by canonical global name.

    ``model`` is a :class:`~megatron_rlhf.models.heads.RoleModel` (optionally inside DDP); names
    are read through the layer spec it carries (:func:`model_transformer_impl`).
    """
    from megatron.core import parallel_state

    impl = model_transformer_impl(model, impl)

    trunk = model
    while not hasattr(trunk, "decoder") and hasattr(trunk, "module"):
        trunk = trunk.module
    num_local_experts = None
    expert_rank = parallel_state.get_expert_model_parallel_rank()
    found: dict[str, LocalParameter] = {}
    for raw_name, parameter in model.named_parameters():
        name = canonical_name(_strip_wrappers(raw_name), impl)
        layer_match = _LAYER.match(name)
        if layer_match:
            layer = trunk.decoder.layers[int(layer_match.group(1))]
            global_layer = global_layer_index(layer)
            name = _LAYER.sub(f"decoder.layers.{global_layer}.", name, count=1)
            expert_match = _EXPERT.search(name)
            if expert_match:
                if num_local_experts is None:
                    num_local_experts = len(layer.mlp.experts.local_experts)
                global_expert = expert_rank * num_local_experts + int(expert_match.group(1))
                name = _EXPERT.sub(f".local_experts.{global_expert}.", name, count=1)
        found[name] = LocalParameter(name, parameter)
    return found


def _tp_group_for(rule_expert: bool):
    from megatron.core import parallel_state

    if rule_expert:
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _read_full(placed: PlacedRule, reader, arch: ArchSpec, padded_vocab: int) -> torch.Tensor:
    tensors = [reader.get(name) for name in placed.rule.hf]
    full = to_megatron(placed.rule, tensors, arch)
    if placed.rule.vocab_padded:
        if full.shape[0] != arch.vocab_size:
            raise WeightMappingError(
                f"{placed.rule.hf[0]} has {full.shape[0]} rows but config vocab_size is "
                f"{arch.vocab_size}"
            )
        full = pad_vocab(full, padded_vocab)
    return full


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module, reader, arch: ArchSpec, role: str, padded_vocab: int, impl: str | None = None
) -> list[str]:
    """Fill this rank's shards of ``model`` from ``reader`` (an HFWeightReader).

    Returns the Megatron names left as initialised because the rule is optional and the HF
    checkpoint lacks them (e.g. a fresh reward head).
    """
    rules = {placed.rule.megatron: placed for placed in expand_rules(arch, role)}
    skipped = []
    for name, local in local_parameters(model, impl).items():
        placed = rules.get(name)
        if placed is None:
            raise WeightMappingError(
                f"parameter {name} of the {arch.family} model has no HF mapping rule"
            )
        if placed.rule.optional and not all(hf in reader for hf in placed.rule.hf):
            skipped.append(name)
            continue
        full = _read_full(placed, reader, arch, padded_vocab)
        group = _tp_group_for(placed.rule.expert)
        part = shard(placed.rule, full, group.rank(), group.size())
        if tuple(part.shape) != tuple(local.parameter.shape):
            raise WeightMappingError(
                f"{name}: HF tensors {placed.rule.hf} give shard shape {tuple(part.shape)}, "
                f"model expects {tuple(local.parameter.shape)}"
            )
        local.parameter.copy_(part.to(local.parameter.dtype))
    return skipped


def _gather(shard_tensor: torch.Tensor, placed: PlacedRule) -> torch.Tensor:
    group = _tp_group_for(placed.rule.expert)
    if placed.rule.split == "replicated" or group.size() == 1:
        return shard_tensor
    parts = [torch.empty_like(shard_tensor) for _ in range(group.size())]
    torch.distributed.all_gather(parts, shard_tensor.contiguous(), group=group)
    return unshard(placed.rule, parts)


def _broadcast_from(tensor: torch.Tensor | None, owner_rank_in_group: int, group) -> torch.Tensor:
    """Broadcast a tensor whose shape only the owner knows to every rank of ``group``."""
    if group.size() == 1:
        assert tensor is not None
        return tensor
    header = [None]
    if group.rank() == owner_rank_in_group:
        assert tensor is not None
        header = [(tuple(tensor.shape), tensor.dtype)]
    source = torch.distributed.get_global_rank(group, owner_rank_in_group)
    torch.distributed.broadcast_object_list(header, src=source, group=group)
    shape, dtype = header[0]
    if tensor is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tensor = torch.empty(shape, dtype=dtype, device=device)
    torch.distributed.broadcast(tensor, src=source, group=group)
    return tensor


def _gather_to_first(shard_tensor: torch.Tensor, placed: PlacedRule) -> torch.Tensor | None:
    """The full tensor on this TP group's rank 0 (None on the other members)."""
    group = _tp_group_for(placed.rule.expert)
    if placed.rule.split == "replicated" or group.size() == 1:
        return shard_tensor if group.rank() == 0 else None
    first = torch.distributed.get_global_rank(group, 0)
    parts = [torch.empty_like(shard_tensor) for _ in range(group.size())] if group.rank() == 0 else None
    torch.distributed.gather(shard_tensor.contiguous(), parts, dst=first, group=group)
    return unshard(placed.rule, parts) if parts is not None else None


def _in_first_column(expert: bool) -> bool:
    """Whether this rank is in global rank 0's data-parallel column (the replica that exports)."""
    from megatron.core import parallel_state

    if expert:
        return parallel_state.get_expert_data_parallel_rank() == 0
    return parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_context_parallel_rank() == 0


_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> ``{(role, rule position): (sending rank, shape, dtype)}`` of its ``only_rank0`` exports."""


def _routes_of(model: Any) -> dict:
    """The remembered routes of ``model``'s exports (a fresh dict where it cannot be remembered).
    Every rank remembers after the same, first, export, so all skip the agreement together."""
    try:
        return _ROUTES.setdefault(model, {})
    except TypeError:  # not weakly referenceable (a list of chunks)
        return {}


def _to_rank0(full: torch.Tensor | None, sender: bool, known: tuple | None = None) -> tuple[torch.Tensor, tuple]:
    """Move the one exporting rank's tensor to global rank 0; a ``meta`` stand-in elsewhere.
    ``known``: ``(sending rank, shape, dtype)`` from an earlier export (nothing agreed then);
    returns the tensor and that triple."""
    rank = torch.distributed.get_rank()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL reduces CUDA tensors only
    if torch.distributed.get_world_size() == 1:
        return full, (0, tuple(full.shape), full.dtype)
    if known is None:
        flags = torch.zeros(torch.distributed.get_world_size(), dtype=torch.int64, device=device)
        header = [(tuple(full.shape), full.dtype) if sender else None]
        flags[rank] = int(sender)
        torch.distributed.all_reduce(flags)
        source = int(flags.nonzero()[0])
        torch.distributed.broadcast_object_list(header, src=source)
        known = (source, *header[0])
    source, shape, dtype = known
    if rank == source and (full is None or tuple(full.shape) != shape or full.dtype != dtype):
        raise RuntimeError(f"rank {rank} was to send a {shape} {dtype} tensor to rank 0 for the weight export, "
                           f"not {None if full is None else (tuple(full.shape), full.dtype)}: the model changed")
    if rank == 0 and source != 0:
        full = torch.empty(shape, dtype=dtype, device=device)
        torch.distributed.recv(full, src=source)
    elif rank == source and source != 0:
        torch.distributed.send(full.contiguous(), dst=0)
    return (full if rank == 0 else torch.empty(shape, dtype=dtype, device="meta")), known


@torch.no_grad()
def export_hf_weights(
    model: torch.nn.Module, arch: ArchSpec, role: str, impl: str | None = None, only_rank0: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for the full model on every rank, or materialised on global
    rank 0 only with ``only_rank0`` (``meta`` tensors elsewhere; see module docstring)."""
    from megatron.core import parallel_state

    local = local_parameters(model, impl)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    ep_group = parallel_state.get_expert_model_parallel_group()
    pp_size = pp_group.size()
    my_layers = sorted({int(m.group(1)) for n in local if (m := _LAYER.match(n))})
    owners: list = [None] * pp_size
    torch.distributed.all_gather_object(owners, (pp_group.rank(), my_layers), group=pp_group)
    stage_of_layer = {layer: stage for stage, layers in owners for layer in layers}
    num_local_experts = (arch.num_experts or 1) // ep_group.size()

    routes = _routes_of(model) if only_rank0 else {}
    for position, placed in enumerate(expand_rules(arch, role)):
        rule = placed.rule
        if rule.import_only:
            continue
        if placed.layer is not None:
            owner_stage = stage_of_layer[placed.layer]
        else:
            owner_stage = 0 if placed.first_stage else pp_size - 1
        owner_expert_rank = placed.expert // num_local_experts if placed.expert is not None else None
        holds = pp_group.rank() == owner_stage and (
            owner_expert_rank is None or ep_group.rank() == owner_expert_rank
        )
        full = None
        if holds and rule.megatron not in local:
            raise WeightMappingError(f"{rule.megatron} not found on pipeline stage {owner_stage}")
        if only_rank0:
            if holds and _in_first_column(rule.expert):
                full = _gather_to_first(local[rule.megatron].parameter.detach(), placed)
            full, routes[role, position] = _to_rank0(full, full is not None, routes.get((role, position)))
            if rule.vocab_padded:
                full = full[: arch.vocab_size]
            yield from zip(rule.hf, to_hf(rule, full, arch))
            continue
        if holds:
            full = _gather(local[rule.megatron].parameter.detach(), placed)
        if owner_expert_rank is not None and pp_group.rank() == owner_stage:
            full = _broadcast_from(full, owner_expert_rank, ep_group)
        full = _broadcast_from(full, owner_stage, pp_group)
        if rule.vocab_padded:
            full = full[: arch.vocab_size]
        for hf_name, tensor in zip(rule.hf, to_hf(rule, full, arch)):
            yield hf_name, tensor
