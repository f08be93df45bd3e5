"""The per-architecture weight mappings, by family, expanded to concrete names for a model.

:func:`expand_rules` lists every parameter of a full model (all layers, all experts) in a fixed
global order: embeddings first, then layer by layer, then the final norm and head. The engine,
the checkpoint converters and weight sync into vLLM all use this one list.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from megatron_rlhf.mapping import glm, glm4, llama, mixtral, qwen2, qwen3, qwen3_moe
from megatron_rlhf.mapping.rules import WeightRule
from megatron_rlhf.models.arch import ArchSpec, UnsupportedArchitecture

MAPPINGS: dict[str, ModuleType] = {
    module.FAMILY: module for module in (llama, qwen2, qwen3, glm, glm4, qwen3_moe, mixtral)
}


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


def mapping_for(arch: ArchSpec) -> ModuleType:
    try:
        return MAPPINGS[arch.family]
    except KeyError:
        raise UnsupportedArchitecture(
            f"no weight mapping for family {arch.family!r} (have: {', '.join(sorted(MAPPINGS))})"
        ) from None


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
