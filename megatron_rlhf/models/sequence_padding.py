"""Sequence lengths that every split of the sequence dimension accepts.

Megatron's sequence parallelism cuts the sequence into TP equal shards (``[T / TP, B, H]``
between tensor-parallel regions), and context parallelism into ``2 * CP`` equal chunks; Megatron
asserts divisibility deep inside. A microbatch of any length is therefore right-padded to a
multiple of :func:`sequence_multiple` before the model sees it, and the last stage's per-token
output is cut back to the original length (:func:`run_padded`); the pipeline schedule is told
the padded length (:func:`schedule_seq_length`), so activations sent between stages have the
shape Megatron expects.

Guarantees: attention is causal and the padding comes after every real token, so the outputs
at real positions are those of the unpadded sequence (dense models exactly; MoE too, since the
router has no capacity limit, each token is routed on its own). Not guaranteed: an MoE
load-balancing auxiliary loss (``moe_aux_loss_coeff > 0``) counts the padding tokens too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def sequence_multiple(config: Any) -> int:
    """The multiple every sequence length must be under ``config`` (a Megatron
    ``TransformerConfig``): TP under sequence parallelism, times ``2 * CP`` under context
    parallelism; 1 when neither splits the sequence."""
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    if config.context_parallel_size > 1:
        multiple *= 2 * config.context_parallel_size
    return multiple


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


def schedule_seq_length(config: Any, length: int) -> int:
    """The sequence length to give Megatron's pipeline schedule for microbatches of ``length``."""
    return padded_length(length, sequence_multiple(config))


def pad_microbatch(microbatch: dict[str, torch.Tensor], length: int, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """A copy of ``microbatch`` whose ``input_ids`` (and ``position_ids``: continuing each row)
    are right-padded to ``length``; other entries (``sequence_lengths``, ...) are unchanged."""
    input_ids = microbatch["input_ids"]
    extra = length - input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a sequence of length {input_ids.shape[1]} down to {length}")
    positions = microbatch.get("position_ids")
    if positions is None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    padded = dict(microbatch)
    padded["input_ids"] = torch.nn.functional.pad(input_ids, (0, extra), value=pad_token_id)
    tail = positions[:, -1:] + torch.arange(1, extra + 1, device=positions.device)
    padded["position_ids"] = torch.cat([positions, tail], dim=1)
    return padded


def run_padded(
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    microbatch: dict[str, torch.Tensor],
    multiple: int,
    is_last_stage: bool,
) -> torch.Tensor:
    """``run(microbatch)`` on the microbatch padded to a multiple of ``multiple``; on the last
    stage, per-token outputs (``[B, T_padded, ...]``) are cut back to ``[B, T, ...]`` (per-sequence
    outputs ``[B]`` are returned as they are). Other stages return the padded activations."""
    length = microbatch["input_ids"].shape[1]
    target = padded_length(length, multiple)
    if target == length:
        return run(microbatch)
    output = run(pad_microbatch(microbatch, target))
    if is_last_stage and output.dim() >= 2:
        return output[:, :length]
    return output
