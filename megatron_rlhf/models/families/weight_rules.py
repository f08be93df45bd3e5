"""Weight rules as name templates: how one Megatron parameter is made of Hugging Face tensors.

A :class:`WeightRule` names a Megatron parameter (local-spec name, with ``{layer}``/``{expert}``
placeholders for the global layer and expert index), the HF tensors it is made of, how they
combine (``copy``, fused ``qkv``, fused ``glu`` gate/up) and how the full tensor is split over
tensor-parallel ranks (``replicated``, ``column`` = dim 0, ``row`` = dim 1, ``glu`` = dim 0 of the
gate and the up halves separately). The building blocks below (embeddings, attention, dense and
MoE MLPs) are what each family module (:mod:`megatron_rlhf.models.families`) composes.

Everything here is names only (no tensors, no torch): it sits in the ``models`` layer so the
family modules can use it; the tensor transforms that apply a rule live in
:mod:`megatron_rlhf.mapping.rules`.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rlhf.models.arch_spec import ArchSpec

COMBINES = ("copy", "qkv", "glu")
SPLITS = ("replicated", "column", "row", "glu")


@dataclass(frozen=True)
class WeightRule:
    megatron: str
    """Megatron local-spec name; may contain ``{layer}`` and ``{expert}``."""
    hf: tuple[str, ...]
    """HF tensor names (same placeholders), in the order ``combine`` expects."""
    combine: str = "copy"
    split: str = "replicated"
    vocab_padded: bool = False
    """Rows beyond the HF vocabulary are Megatron padding (zeros on import, dropped on export)."""
    expert: bool = False
    """Split over the expert-tensor-parallel group and owned by one expert-parallel rank."""
    import_only: bool = False
    """Filled on import but not exported (a tied copy, e.g. the last stage's output layer)."""
    optional: bool = False
    """May be absent from an HF checkpoint (e.g. a fresh reward head); left as initialised."""

    def __post_init__(self) -> None:
        if self.combine not in COMBINES:
            raise ValueError(f"combine={self.combine!r} (choose from {COMBINES})")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} (choose from {SPLITS})")
        expected = {"copy": 1, "qkv": 3, "glu": 2}[self.combine]
        if len(self.hf) != expected:
            raise ValueError(f"{self.megatron}: combine={self.combine} takes {expected} HF names")

    def format(self, layer: int | None = None, expert: int | None = None) -> "WeightRule":
        """This rule with the placeholders filled in."""
        fields = {"layer": layer, "expert": expert}
        return WeightRule(
            megatron=self.megatron.format(**fields),
            hf=tuple(name.format(**fields) for name in self.hf),
            combine=self.combine,
            split=self.split,
            vocab_padded=self.vocab_padded,
            expert=self.expert,
            import_only=self.import_only,
            optional=self.optional,
        )


# Building blocks shared by the family modules -----------------------------------


def embedding_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    """Word embeddings, final norm, and the LM output layer (tied or not) / scalar head."""
    rules = [
        WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                   split="column", vocab_padded=True),
    ]
    if role == "lm":
        rules.append(WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",)))
        if arch.tie_word_embeddings:
            rules.append(WeightRule("output_layer.weight", ("model.embed_tokens.weight",),
                                    split="column", vocab_padded=True, import_only=True))
        else:
            rules.append(WeightRule("output_layer.weight", ("lm_head.weight",),
                                    split="column", vocab_padded=True))
    else:
        rules.append(WeightRule("head.final_layernorm.weight", ("model.norm.weight",)))
        rules.append(WeightRule("head.score.weight", ("score.weight",), optional=True))
    return rules


def attention_rules(arch: ArchSpec, prefix: str = "model.layers.{layer}") -> list[WeightRule]:
    """Input norm, fused QKV (+bias), optional QK norms and the output projection."""
    base = "decoder.layers.{layer}"
    attention = f"{prefix}.self_attn"
    rules = [
        WeightRule(f"{base}.input_layernorm.weight", (f"{prefix}.input_layernorm.weight",)),
        WeightRule(
            f"{base}.self_attention.linear_qkv.weight",
            tuple(f"{attention}.{p}_proj.weight" for p in "qkv"),
            combine="qkv",
            split="column",
        ),
        WeightRule(f"{base}.self_attention.linear_proj.weight", (f"{attention}.o_proj.weight",),
                   split="row"),
    ]
    if arch.qkv_bias:
        rules.append(WeightRule(
            f"{base}.self_attention.linear_qkv.bias",
            tuple(f"{attention}.{p}_proj.bias" for p in "qkv"),
            combine="qkv",
            split="column",
        ))
    if arch.qk_layernorm:
        rules.append(WeightRule(f"{base}.self_attention.q_layernorm.weight",
                                (f"{attention}.q_norm.weight",)))
        rules.append(WeightRule(f"{base}.self_attention.k_layernorm.weight",
                                (f"{attention}.k_norm.weight",)))
    return rules


def dense_mlp_rules(prefix: str = "model.layers.{layer}", fused_gate_up: bool = False) -> list[WeightRule]:
    """Pre-MLP norm and a SwiGLU MLP (separate or fused gate/up projections in HF)."""
    base = "decoder.layers.{layer}"
    fc1 = (
        WeightRule(f"{base}.mlp.linear_fc1.weight", (f"{prefix}.mlp.gate_up_proj.weight",),
                   split="glu")
        if fused_gate_up
        else WeightRule(f"{base}.mlp.linear_fc1.weight",
                        (f"{prefix}.mlp.gate_proj.weight", f"{prefix}.mlp.up_proj.weight"),
                        combine="glu", split="glu")
    )
    return [
        WeightRule(f"{base}.pre_mlp_layernorm.weight", (f"{prefix}.post_attention_layernorm.weight",)),
        fc1,
        WeightRule(f"{base}.mlp.linear_fc2.weight", (f"{prefix}.mlp.down_proj.weight",), split="row"),
    ]


def moe_mlp_rules(router: str, gate: str, up: str, down: str,
                  prefix: str = "model.layers.{layer}") -> list[WeightRule]:
    """Pre-MLP norm, router and per-expert SwiGLU weights (HF names relative to ``prefix``)."""
    base = "decoder.layers.{layer}"
    expert = f"{base}.mlp.experts.local_experts.{{expert}}"
    return [
        WeightRule(f"{base}.pre_mlp_layernorm.weight", (f"{prefix}.post_attention_layernorm.weight",)),
        WeightRule(f"{base}.mlp.router.weight", (f"{prefix}.{router}",)),
        WeightRule(f"{expert}.linear_fc1.weight", (f"{prefix}.{gate}", f"{prefix}.{up}"),
                   combine="glu", split="glu", expert=True),
        WeightRule(f"{expert}.linear_fc2.weight", (f"{prefix}.{down}",), split="row", expert=True),
    ]
