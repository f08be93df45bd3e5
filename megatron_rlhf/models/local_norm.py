"""The norms of the local layer spec, usable under Megatron sequence parallelism.

Megatron-Core's local spec builds its norms with ``WrappedTorchNorm`` (``torch.nn.RMSNorm`` /
``LayerNorm``), which refuses ``sequence_parallel=True``; only Transformer Engine's norms accept
it. Yet a norm acts on each token alone, so on a sequence-parallel shard (``[T / TP, B, H]``) the
same module computes exactly its part of the full output. The only thing sequence parallelism
changes is the weight gradient: each TP rank sees only its tokens, so its gradient is a partial
sum. Megatron-Core sums those over the TP group in ``finalize_model_grads`` for every parameter
carrying ``sequence_parallel=True`` (its router marks its weight the same way); :class:`LocalNorm`
sets that mark on its weight (and LayerNorm bias) whenever the config asks for sequence
parallelism, as Transformer Engine's norms do.

Guarantees: :class:`LocalNorm` builds a plain ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm`` (same
parameter names ``weight``/``bias`` as ``WrappedTorchNorm``, so checkpoints, the HF mapping and
weight sync do not change); with sequence parallelism off it is the same module as Megatron's.
:func:`with_local_norms` swaps it into a local layer spec (input, pre-MLP and q/k norms);
:func:`megatron_rlhf.parallel.megatron_compat.decoder_block_spec` puts it at the final norm.

Not covered: Megatron's ``zero_centered_gamma``, ``persist_layer_norm`` and
``memory_efficient_layer_norm`` (fused-kernel options; refused with a clear error, as Megatron's
torch norm does).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

_NORMS = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}


class LocalNorm:
    """A layer-spec norm: ``torch.nn.RMSNorm`` or ``LayerNorm`` by ``config.normalization``,
    its parameters marked ``sequence_parallel`` as the config says (see the module docstring).

    Called like Megatron's ``WrappedTorchNorm`` (``config``, ``hidden_size``, ``eps``); returns the
    torch module itself, so the built model holds only standard modules.
    """

    def __new__(  # noqa: D102 - documented on the class
        cls,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ) -> torch.nn.Module:
        for option in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, option, False):
                raise ValueError(
                    f"{option}=True is a fused-kernel option the local layer spec's norm does not "
                    "have; turn it off or use transformer_impl='transformer_engine'"
                )
        kind = config.normalization
        if kind not in _NORMS:
            raise ValueError(f"normalization={kind!r}: the local norm supports {tuple(_NORMS)}")
        norm = _NORMS[kind](hidden_size, eps=eps)
        for parameter in norm.parameters():
            parameter.sequence_parallel = bool(config.sequence_parallel)
        return norm


def with_local_norms(layer_spec: Any) -> Any:
    """A copy of a local GPT layer spec whose norms (input, pre-MLP, q/k) are :class:`LocalNorm`.

    Slots holding ``IdentityOp`` (no norm) or anything that is not Megatron's torch norm stay
    as they are.
    """
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    spec = copy.deepcopy(layer_spec)
    layer = spec.submodules
    slots = [(layer, "input_layernorm"), (layer, "pre_mlp_layernorm")]
    attention = getattr(layer.self_attention, "submodules", None)
    if attention is not None:
        slots += [(attention, "q_layernorm"), (attention, "k_layernorm")]
    for owner, name in slots:
        if getattr(owner, name, None) is WrappedTorchNorm:
            setattr(owner, name, LocalNorm)
    return spec
