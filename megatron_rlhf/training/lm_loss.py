"""Next-token language-modelling loss from vocab-parallel logits (SFT, perturbation steps)."""

from __future__ import annotations

import torch


def next_token_loss(
    logits: torch.Tensor, microbatch: dict[str, torch.Tensor], valid_vocab_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean ``-log p(token_{t+1} | tokens_<=t)`` over all positions of ``input_ids`` ``[B, T]``.

    ``logits``: ``[B, T, V_padded / TP]`` from the last pipeline stage. An optional ``loss_mask``
    ``[B, T]`` in the microbatch (1 = predict this token) restricts the mean to those targets.
    Returns ``(loss, {"loss": loss})`` as :class:`~megatron_rlhf.training.megatron_step.MegatronUpdater`
    expects.
    """
    from megatron.core import parallel_state

    from megatron_rlhf.models.logprobs import vocab_parallel_logprobs

    targets = microbatch["input_ids"][:, 1:]
    logprobs = vocab_parallel_logprobs(
        logits[:, :-1], targets, parallel_state.get_tensor_model_parallel_group(),
        valid_vocab_size=valid_vocab_size,
    )
    mask = microbatch.get("loss_mask")
    if mask is None:
        loss = -logprobs.mean()
    else:
        weights = mask[:, 1:].to(logprobs.dtype)
        loss = -(logprobs * weights).sum() / weights.sum().clamp(min=1.0)
    return loss, {"loss": loss.detach()}
