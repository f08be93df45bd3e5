"""GLM-4 in HF's ``GlmForCausalLM`` layout (the policy family of "Does RLHF Scale?") <-> Megatron.

Differences from Llama, all expressed in the ArchSpec or here: QKV bias, rotary embeddings on the
first half of each head's dims with interleaved pairs (Megatron: ``rotary_percent=0.5``,
``rotary_interleaved=True``), and a gate/up projection that HF already stores fused as
``mlp.gate_up_proj`` (``[gate; up]``, the same order Megatron's ``linear_fc1`` uses).
"""

from __future__ import annotations

from megatron_rlhf.mapping.rules import WeightRule, attention_rules, dense_mlp_rules, embedding_rules
from megatron_rlhf.models.arch import ArchSpec

FAMILY = "glm"


def global_rules(arch: ArchSpec, role: str) -> list[WeightRule]:
    return embedding_rules(arch, role)


def layer_rules(arch: ArchSpec, moe_layer: bool) -> list[WeightRule]:
    return attention_rules(arch) + dense_mlp_rules(fused_gate_up=True)
