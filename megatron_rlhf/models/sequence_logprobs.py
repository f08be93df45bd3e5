"""Per-token log-probabilities of given responses under a (pipelined, tensor-parallel) LM.

:func:`response_logprobs` runs prompt + response sequences through the model with Megatron's
schedule and returns ``log pi(response_t | prefix)`` for every response token, computed from
vocab-parallel logits (:mod:`megatron_rlhf.models.logprobs`), on every rank: the last pipeline
stage computes them and broadcasts them over the pipeline group.
"""

from __future__ import annotations

import torch

from megatron_rlhf.types import RolloutBatch


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    batch: RolloutBatch,
    valid_vocab_size: int,
    temperature: float = 1.0,
    micro_batch_size: int = 4,
) -> torch.Tensor:
    """``[B, R]`` float32 log-probs of ``batch.response_ids`` (0.0 on padding)."""
    from megatron.core import parallel_state

    from megatron_rlhf.models.forward import forward_only
    from megatron_rlhf.models.logprobs import vocab_parallel_logprobs
    from megatron_rlhf.parallel.pipeline import broadcast_from_last_stage

    input_ids, response_start = batch.full_sequences()
    count, width = input_ids.shape
    device = next(model.parameters()).device
    padded_count = -(-count // micro_batch_size) * micro_batch_size
    if padded_count > count:  # equal microbatches for the schedule; extra rows are discarded
        filler = torch.full((padded_count - count, width), batch.pad_token_id, dtype=torch.long)
        input_ids = torch.cat([input_ids, filler])
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def collect(logits: torch.Tensor, microbatch: dict) -> torch.Tensor:
        targets = microbatch["input_ids"][:, 1:]
        return vocab_parallel_logprobs(
            logits[:, :-1], targets, tp_group, temperature=temperature, valid_vocab_size=valid_vocab_size
        ).cpu()

    microbatches = [{"input_ids": part.to(device)} for part in input_ids.split(micro_batch_size)]
    outputs = forward_only(model, microbatches, collect)
    token_logprobs = torch.cat(outputs)[:count] if outputs else torch.empty(count, max(width - 1, 0))
    token_logprobs = broadcast_from_last_stage(token_logprobs)
    result = torch.zeros_like(batch.sampling_logprobs)
    lengths = batch.response_lengths
    for row in range(count):
        start, length = int(response_start[row]), int(lengths[row])
        # logits at position p predict token p + 1: response token j sits at start + j.
        result[row, :length] = token_logprobs[row, start - 1 : start - 1 + length]
    return result
