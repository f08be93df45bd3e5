"""The weight rules of a model's family, expanded to concrete names for a model.

Each family declares its rules (name templates) in its module under
:mod:`megatron_rlhf.models.families`; this module finds the family of an :class:`ArchSpec` and
fills in the layer and expert indices.

:func:`expand_rules` lists every parameter of a full model (all layers, all experts) in a fixed
global order: embeddings first, then layer by layer, then the final norm and head. The engine,
the checkpoint converters and weight sync into vLLM all use this one list.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rlhf.models.arch_spec import ArchSpec
from megatron_rlhf.models.families.family import ModelFamily
from megatron_rlhf.models.families.registry import family_named
from megatron_rlhf.models.families.weight_rules import WeightRule


@dataclass(frozen=True)
class PlacedRule:
    """A rule with its placeholders filled, and where its parameter lives."""

    rule: WeightRule
    layer: int | None
    """Global layer index; None for embedding/final norm/head."""
    expert: int | None
    """Global expert index; None for non-expert parameters."""
    first_stage: bool
    """Lives on the first pipeline stage (embedding); else the last (norm, head) if layer is None."""


def mapping_for(arch: ArchSpec) -> ModelFamily:
    """The family record whose ``global_rules`` / ``layer_rules`` map ``arch``'s weights."""
    return family_named(arch.family)


def expand_rules(arch: ArchSpec, role: str = "lm") -> list[PlacedRule]:
    """Every parameter of the full model for ``role``, in global order."""
    mapping = mapping_for(arch)
    head_rules = mapping.global_rules(arch, role)
    placed = [PlacedRule(r, None, None, True) for r in head_rules if r.megatron.startswith("embedding.")]
    for layer in range(arch.num_layers):
        moe_layer = bool(arch.moe_layer_pattern and arch.moe_layer_pattern[layer])
        for rule in mapping.layer_rules(arch, moe_layer):
            if rule.expert:
                assert arch.num_experts is not None
                for expert in range(arch.num_experts):
                    placed.append(PlacedRule(rule.format(layer=layer, expert=expert), layer, expert, False))
            else:
                placed.append(PlacedRule(rule.format(layer=layer), layer, None, False))
    placed += [
        PlacedRule(r, None, None, False) for r in head_rules if not r.megatron.startswith("embedding.")
    ]
    return placed
