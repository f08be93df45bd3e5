"""Per-response-token log-probabilities under a (pipelined, tensor-parallel) LM: the one path.

The actor's old log-probs, its new log-probs inside the PPO loss and the reference's log-probs
all come from here, so that two models with identical weights, at the same layout, give
bitwise identical log-probs and the KL between actor and reference at step 0 is exactly zero:

* :func:`microbatch_response_logprobs`: the per-microbatch computation (the vocab-parallel
  log-softmax of :mod:`megatron_rlhf.models.logprobs` at one temperature, over the tokens the
  tokenizer defines, of the logits at the response positions: the model runs its output layer
  there only, :mod:`megatron_rlhf.models.logit_positions`), used by the no-grad passes below and
  by the actor's loss (with gradients).
* :func:`response_logprobs` (reference, weight-sync check) and
  :func:`response_logprobs_and_entropy` (actor, entropy in the same pass): one forward-only pass
  over the batch (:func:`per_response_token`: equal microbatches, filled with copies of the first
  sample and discarded; results on the last pipeline stage, broadcast over the pipeline group),
  ``[B, R]`` float32, 0.0 where ``response_mask`` is 0. Computing the entropy does not change a
  bit of the log-probs (see :func:`megatron_rlhf.models.logprobs.logprobs_and_entropy`).

Packing (``packing=True``, :mod:`megatron_rlhf.models.packing`): each microbatch is one row of
its samples' sequences concatenated without padding (THD, ``packed_seq_params``), holding
``micro_batch_size`` samples or, with ``max_tokens_per_microbatch > 0``, as many as fit that
token budget; the read positions move into the row (:func:`packed_response_microbatches`) and the
results are put back in batch order. Same values as the padded path up to float summation order.

Alignment: the logits at position ``p`` predict token ``p + 1``, so response token ``t`` of a
sample whose prompt has ``P`` tokens is read at position ``P - 1 + t``.

Not guaranteed: equality across different layouts (TP/PP change reduction orders, so the
log-probs agree within float tolerance only), or across different shares of a batch (another
microbatch composition may change the kernels' blocking).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from megatron_rlhf.types import RolloutBatch


def response_positions(batch: RolloutBatch) -> tuple[Tensor, Tensor]:
    """``(input_ids [B, L], positions [B, R])``: output position predicting each response token."""
    input_ids, response_start = batch.full_sequences()
    if batch.num_samples and int(batch.prompt_lengths.min()) < 1:
        raise ValueError("every prompt needs at least one token (prompt_lengths has a 0)")
    width = batch.response_ids.shape[1]
    positions = response_start.unsqueeze(1) - 1 + torch.arange(width).unsqueeze(0)
    return input_ids, positions.clamp(0, max(input_ids.shape[1] - 2, 0))


def gather_responses(token_outputs: Tensor, positions: Tensor) -> Tensor:
    """``[b, L']`` per-position outputs -> ``[b, R]`` at the response positions; a packed row
    (``[1, L']``) serves every sample of its microbatch (``positions [b, R]`` index into it)."""
    if token_outputs.shape[0] == 1 and positions.shape[0] != 1:
        token_outputs = token_outputs.expand((positions.shape[0],) + tuple(token_outputs.shape[1:]))
    return token_outputs.gather(1, positions.to(token_outputs.device))


def sample_lengths(batch: RolloutBatch) -> Tensor:
    """``[B]`` long: prompt + response tokens of each sample (its real positions)."""
    return batch.prompt_lengths.to(torch.long) + batch.response_lengths.to(torch.long)


def packed_response_microbatches(
    model: torch.nn.Module,
    batch: RolloutBatch,
    samples: Tensor,
    micro_batch_size: int,
    max_tokens_per_microbatch: int,
    sequences: tuple[Tensor, Tensor] | None = None,
) -> list[dict]:
    """Packed microbatches (:func:`~megatron_rlhf.models.packing.pack_microbatch`, on the
    model's device) of the rows ``samples`` of ``batch``: ``micro_batch_size`` samples each, or
    within ``max_tokens_per_microbatch`` tokens when it is > 0. Rows are padded at their tail to
    what sequence parallelism splits, and to one common length under pipeline parallelism.
    ``sequences``: :func:`response_positions` of ``batch`` when the caller already has it."""
    from megatron.core import parallel_state

    from megatron_rlhf.models.packing import packed_microbatches, packed_to, token_budget_microbatches
    from megatron_rlhf.models.sequence_padding import sequence_multiple

    config = model.config
    if config.context_parallel_size > 1:
        raise ValueError("packed sequences do not cover context parallelism (context_parallel > 1); "
                         "set update.packing: false")
    input_ids, positions = sequences if sequences is not None else response_positions(batch)
    lengths = sample_lengths(batch)
    plan = token_budget_microbatches(lengths[samples].tolist(), max_tokens_per_microbatch, micro_batch_size)
    plan = [samples[members].tolist() for members in plan]
    microbatches = packed_microbatches(input_ids, lengths, positions, plan, sequence_multiple(config),
                                       parallel_state.get_pipeline_model_parallel_world_size() > 1,
                                       batch.pad_token_id)
    device = next(model.parameters()).device
    return [packed_to(microbatch, device) for microbatch in microbatches]


def per_response_token(
    model: torch.nn.Module,
    batch: RolloutBatch,
    micro_batch_size: int,
    collect: Callable[[Tensor, dict], Tensor],
    trailing_shape: tuple[int, ...] = (),
    packing: bool = False,
    max_tokens_per_microbatch: int = 0,
) -> Tensor:
    """``[B, R, *trailing_shape]`` float32 of ``collect(output, microbatch) -> [b, R, *trailing_shape]``
    over the batch, on every rank, 0.0 where ``response_mask`` is 0 (no gradient). The stages before
    the last receive the result in a buffer of that shape.

    ``microbatch`` holds ``input_ids [b, L]`` (on the model's device) and ``positions [b, R]``
    (:func:`response_positions`); packed (``packing``), ``input_ids [1, T]`` and the THD entries
    of :func:`packed_response_microbatches`.
    """
    from megatron_rlhf.models.forward import forward_only
    from megatron_rlhf.parallel.pipeline import broadcast_from_last_stage

    if packing:
        return _per_response_token_packed(model, batch, micro_batch_size, collect, trailing_shape,
                                          max_tokens_per_microbatch)
    input_ids, positions = response_positions(batch)
    count = batch.num_samples
    padded = -(-count // micro_batch_size) * micro_batch_size
    if padded > count:  # equal microbatches for the schedule; extra rows are discarded
        input_ids = torch.cat([input_ids, input_ids[:1].expand(padded - count, -1)])
        positions = torch.cat([positions, positions[:1].expand(padded - count, -1)])
    device = next(model.parameters()).device
    microbatches = [
        {"input_ids": ids.to(device), "positions": pos}
        for ids, pos in zip(input_ids.split(micro_batch_size), positions.split(micro_batch_size))
    ]
    with torch.no_grad():
        outputs = forward_only(model, microbatches, lambda out, mb: collect(out, mb).float().cpu())
    result = torch.cat(outputs)[:count] if outputs else torch.zeros((count, positions.shape[1]) + trailing_shape)
    result = broadcast_from_last_stage(result)
    return _masked(batch, result)


def _masked(batch: RolloutBatch, result: Tensor) -> Tensor:
    mask = batch.response_mask.to(torch.bool)
    mask = mask.reshape(mask.shape + (1,) * (result.dim() - mask.dim()))
    return torch.where(mask, result, torch.zeros((), dtype=result.dtype))  # no NaN from -inf * 0


def _per_response_token_packed(model, batch, micro_batch_size, collect, trailing_shape, max_tokens) -> Tensor:
    """:func:`per_response_token` over packed microbatches, results put back in batch order."""
    from megatron_rlhf.models.forward import forward_only
    from megatron_rlhf.parallel.pipeline import broadcast_from_last_stage

    count = batch.num_samples
    result = torch.zeros((count, batch.response_ids.shape[1]) + trailing_shape)
    microbatches = packed_response_microbatches(model, batch, torch.arange(count), micro_batch_size, max_tokens)
    with torch.no_grad():
        outputs = forward_only(model, microbatches, lambda out, mb: collect(out, mb).float().cpu())
    if outputs:
        result[torch.cat([microbatch["sample_index"] for microbatch in microbatches])] = torch.cat(outputs)
    return _masked(batch, broadcast_from_last_stage(result))


def microbatch_response_logprobs(
    logits: Tensor,
    microbatch: dict[str, Tensor],
    valid_vocab_size: int,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(log-probs [b, R], entropy [b, R] or None)`` fp32 of one microbatch's response tokens.

    ``logits``: ``[b, R, V/tp]`` this rank's vocab slice at the microbatch's ``positions`` (the
    model computes its output layer there only: :func:`megatron_rlhf.models.forward.run_microbatch`),
    on the last pipeline stage; ``microbatch`` as given by :func:`per_response_token`.
    Differentiable w.r.t. ``logits``; the entropy only when ``entropy_grad`` (False: a metric,
    and backward skips its term). The log-probs are the same bits whatever ``with_entropy`` and
    ``entropy_grad`` say.
    """
    from megatron.core import parallel_state

    from megatron_rlhf.models.logit_positions import next_tokens
    from megatron_rlhf.models.logprobs import logprobs_and_entropy, vocab_parallel_logprobs

    positions = microbatch["positions"]
    if tuple(logits.shape[:2]) != tuple(positions.shape):
        raise ValueError(f"logits {tuple(logits.shape)} are not at the microbatch's response positions "
                         f"{tuple(positions.shape)}: run the model with them (forward.run_microbatch)")
    targets = next_tokens(microbatch["input_ids"], positions, microbatch.get("packed_seq_params") is not None)
    arguments = (logits, targets.to(logits.device), parallel_state.get_tensor_model_parallel_group())
    if with_entropy:
        return logprobs_and_entropy(
            *arguments, temperature=temperature, valid_vocab_size=valid_vocab_size, entropy_grad=entropy_grad
        )
    return vocab_parallel_logprobs(*arguments, temperature=temperature, valid_vocab_size=valid_vocab_size), None


def response_logprobs(
    model: torch.nn.Module,
    batch: RolloutBatch,
    valid_vocab_size: int,
    temperature: float = 1.0,
    micro_batch_size: int = 4,
    packing: bool = False,
    max_tokens_per_microbatch: int = 0,
) -> Tensor:
    """``[B, R]`` float32 ``log softmax(logits / temperature)`` of ``batch.response_ids`` (0.0 on
    padding), on every rank. ``packing`` / ``max_tokens_per_microbatch``: see the module docstring."""

    def collect(logits: Tensor, microbatch: dict) -> Tensor:
        return microbatch_response_logprobs(logits, microbatch, valid_vocab_size, temperature, False)[0]

    return per_response_token(model, batch, micro_batch_size, collect, (), packing, max_tokens_per_microbatch)


def response_logprobs_and_entropy(
    model: torch.nn.Module,
    batch: RolloutBatch,
    valid_vocab_size: int,
    temperature: float = 1.0,
    micro_batch_size: int = 4,
    packing: bool = False,
    max_tokens_per_microbatch: int = 0,
) -> tuple[Tensor, Tensor]:
    """:func:`response_logprobs` (bitwise the same) and the policy entropy per response token
    (nats, ``[B, R]`` float32, 0.0 on padding), in one pass."""

    def collect(logits: Tensor, microbatch: dict) -> Tensor:
        logprobs, entropy = microbatch_response_logprobs(logits, microbatch, valid_vocab_size, temperature, True)
        return torch.stack((logprobs, entropy), dim=-1)

    both = per_response_token(model, batch, micro_batch_size, collect, (2,), packing, max_tokens_per_microbatch)
    return both[..., 0], both[..., 1]
