"""Per-token log-probabilities and entropy from vocab-parallel logits, without gathering the vocab.

Megatron's output layer leaves each tensor-parallel (TP) rank with the logits of one contiguous
slice of the padded vocabulary: rank ``r`` of ``tp`` holds ids ``[r * V/tp, (r + 1) * V/tp)``.
RL losses need ``log pi(token)`` and the policy entropy per token; gathering the full ``[B, T, V]``
logits on every rank to get them would cost ``tp`` times the memory of the largest activation in
the model. This module computes both from the local slices with [B, T]-sized all-reduces only:

* one MAX all-reduce of the per-token local maxima (the shift that keeps ``exp`` finite);
* one SUM all-reduce of a stacked ``[k, B, T]`` tensor holding the partial sums
  ``sum exp(x - m)``, the target logit (non-zero only on the rank owning the target id) and, for
  the entropy, ``sum exp(x - m) * (x - m)``.

Backward needs no communication: with ``log Z`` and the entropy ``H`` known per token, each rank's
gradient for its slice depends only on its own logits (see :class:`_VocabParallelLogprobsEntropy`).

Guarantees: math in fp32 whatever the logits dtype (bf16 in, fp32 log-probs out); log-probs
bitwise the same whether or not the entropy is computed in the same pass; gradients equal
those of ``log_softmax(logits / temperature)`` over the full vocabulary; ids at or beyond
``valid_vocab_size`` (padding rows added so the vocab divides TP) get probability exactly zero and
gradient exactly zero. With ``tp_group`` None or of size 1 the result is plain ``log_softmax``
gather / entropy. An entropy taken as a metric only (``entropy_grad=False``) costs backward nothing
and leaves the logits' gradient bitwise that of the log-probs alone.

Not guaranteed / not checked (checks would force a device sync on every call):
* ``target_ids`` must lie in ``[0, valid_vocab_size)``. An id in the padded range gets log-prob
  ``-inf``; an id beyond the padded vocabulary gets a meaningless value.
* The upstream gradient of the outputs must be the same on every rank of ``tp_group`` (true when
  the loss is computed identically on each TP rank, the Megatron convention). Each rank writes the
  gradient of its own vocab slice from its own copy of the upstream gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def vocab_parallel_logprobs(
    logits: Tensor,
    target_ids: Tensor,
    tp_group: ProcessGroup | None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
) -> Tensor:
    """``log softmax(logits / temperature)[target]`` over the full (sharded) vocabulary.

    Args:
        logits: ``[B, T, V/tp]`` (any leading dims) this rank's vocab slice of the logits, any
            float dtype.
        target_ids: ``[B, T]`` int64 global token ids, identical on every rank of ``tp_group``.
        tp_group: tensor-parallel group the vocabulary is split over; None means unsplit.
        temperature: logits are divided by this (> 0) before the softmax.
        valid_vocab_size: ids ``>= valid_vocab_size`` are padding and get zero probability;
            None means every id of the padded vocabulary is real.

    Returns:
        ``[B, T]`` fp32 log-probabilities, identical on every rank of ``tp_group``; differentiable
        w.r.t. ``logits``.
    """
    logprobs, _ = _apply(logits, target_ids, tp_group, temperature, valid_vocab_size, False)
    return logprobs


def vocab_parallel_entropy(
    logits: Tensor,
    tp_group: ProcessGroup | None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
) -> Tensor:
    """Entropy ``-sum_v p_v log p_v`` of ``softmax(logits / temperature)`` per token (nats).

    Args as in :func:`vocab_parallel_logprobs`. Returns ``[B, T]`` fp32, identical on every rank
    of ``tp_group``; differentiable w.r.t. ``logits``.
    """
    _, entropy = _apply(logits, None, tp_group, temperature, valid_vocab_size, True)
    return entropy


def logprobs_and_entropy(
    logits: Tensor,
    target_ids: Tensor,
    tp_group: ProcessGroup | None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """Both ``[B, T]`` fp32 log-probs of ``target_ids`` and the entropy, in one pass.

    Same arguments as :func:`vocab_parallel_logprobs`; costs the two all-reduces of one call. The
    log-probs are bitwise those :func:`vocab_parallel_logprobs` gives for the same inputs (the
    same operations, and the same all-reduce layout), so the actor's log-probs taken with its
    entropy equal the reference's taken without.

    ``entropy_grad=False``: the entropy is a metric only (not differentiable); backward then does
    the log-probs' work alone, and the logits' gradient is bitwise that of
    :func:`vocab_parallel_logprobs` (the entropy term of an unused entropy is an exact zero).
    """
    logprobs, entropy = _apply(logits, target_ids, tp_group, temperature, valid_vocab_size, True, entropy_grad)
    return logprobs, entropy


def _apply(
    logits: Tensor,
    target_ids: Tensor | None,
    tp_group: ProcessGroup | None,
    temperature: float,
    valid_vocab_size: int | None,
    with_entropy: bool,
    entropy_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    tp_size, tp_rank = _group_size_and_rank(tp_group)
    _check_arguments(logits, target_ids, temperature, valid_vocab_size, tp_size)
    outputs = _VocabParallelLogprobsEntropy.apply(
        logits, target_ids, tp_group, tp_size, tp_rank, temperature, valid_vocab_size, with_entropy, entropy_grad
    )
    logprobs = outputs[0] if target_ids is not None else None
    entropy = outputs[-1] if with_entropy else None
    return logprobs, entropy


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    """Forward: two [B, T] all-reduces. Backward: local, recomputes the softmax of the slice.

    With ``x = logits / temperature``, ``log p_v = x_v - log Z`` and ``H = -sum_v p_v log p_v``:

    * ``d log p_target / d x_v = 1[v = target] - p_v``
    * ``d H / d x_v = -p_v (log p_v + H)``

    Both need only the local ``x_v`` plus the per-token ``log Z`` and ``H`` saved from forward, so
    forward saves the input logits (no fp32 copy of the slice) and backward recomputes ``p_v``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        target_ids: Tensor | None,
        tp_group: ProcessGroup | None,
        tp_size: int,
        tp_rank: int,
        temperature: float,
        valid_vocab_size: int | None,
        with_entropy: bool,
        entropy_grad: bool = True,
    ) -> tuple[Tensor, ...]:
        local_vocab = logits.shape[-1]
        vocab_start = tp_rank * local_vocab
        padding = _padding_mask(logits, vocab_start, valid_vocab_size)

        shifted = logits.float().div(temperature)  # always a fresh fp32 buffer: safe in place
        if padding is not None:
            shifted.masked_fill_(padding, float("-inf"))
        logits_max = shifted.amax(dim=-1)
        if tp_size > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        shifted.sub_(logits_max.unsqueeze(-1))  # x - m, <= 0, -inf at padding

        partial_sums: list[Tensor] = []
        if target_ids is not None:
            target_values = _local_target_values(shifted, target_ids, vocab_start)
        if with_entropy:
            exp_shifted = shifted.exp()
            partial_sums.append(exp_shifted.sum(dim=-1))
            if padding is not None:
                shifted.masked_fill_(padding, 0.0)  # exp is 0 there; avoid 0 * -inf
            partial_sums.append((exp_shifted * shifted).sum(dim=-1))
            del exp_shifted
        else:
            partial_sums.append(shifted.exp_().sum(dim=-1))
            if tp_size > 1 and target_ids is not None:
                # the entropy pass's [3, B, T] layout: one all-reduce of one shape gives the
                # log-probs the same bits with or without the entropy (reduction order can
                # depend on the tensor's size)
                partial_sums.append(torch.zeros_like(partial_sums[0]))
        del shifted
        if target_ids is not None:
            partial_sums.append(target_values)
        sums = torch.stack(partial_sums)
        if tp_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)

        sum_exp = sums[0]
        log_sum_exp = sum_exp.log()
        outputs: list[Tensor] = []
        if target_ids is not None:
            outputs.append(sums[-1] - log_sum_exp)  # log p = (x_t - m) - log sum exp(x - m)
        if with_entropy:
            outputs.append(log_sum_exp - sums[1] / sum_exp)  # H = log Z - E_p[x]

        ctx.tp_rank = tp_rank
        ctx.temperature = temperature
        ctx.valid_vocab_size = valid_vocab_size
        ctx.has_target = target_ids is not None
        ctx.with_entropy = with_entropy and entropy_grad  # backward's entropy term
        entropy = outputs[-1] if ctx.with_entropy else None
        if with_entropy and not entropy_grad:
            ctx.mark_non_differentiable(outputs[-1])  # a metric: no gradient flows from it
        ctx.save_for_backward(logits, target_ids, logits_max, log_sum_exp, entropy)
        return tuple(outputs)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, *grad_outputs: Tensor
    ) -> tuple[Tensor | None, ...]:
        logits, target_ids, logits_max, log_sum_exp, entropy = ctx.saved_tensors
        vocab_start = ctx.tp_rank * logits.shape[-1]
        padding = _padding_mask(logits, vocab_start, ctx.valid_vocab_size)

        # d out / d x_v = -p_v * (g_lp + g_H * (log p_v + H)) + g_lp * 1[v = target]
        log_probs = logits.float().div(ctx.temperature)  # fresh fp32 buffer, reused in place
        # (x - m) - log sum exp(x - m), as in forward: subtracting log Z = m + log S in one step
        # would lose the low bits of log S next to a large m.
        log_probs.sub_(logits_max.unsqueeze(-1)).sub_(log_sum_exp.unsqueeze(-1))
        if padding is not None:
            log_probs.masked_fill_(padding, float("-inf"))
        grad_logprobs = grad_outputs[0].float().unsqueeze(-1) if ctx.has_target else None
        if ctx.with_entropy:
            grad_entropy = grad_outputs[-1].float().unsqueeze(-1)
            probs = log_probs.exp()  # 0 at padding
            if padding is not None:
                log_probs.masked_fill_(padding, 0.0)  # p is 0 there; avoid 0 * -inf
            coefficient = log_probs.add_(entropy.unsqueeze(-1)).mul_(grad_entropy)
            if grad_logprobs is not None:
                coefficient.add_(grad_logprobs)
            grad_x = probs.mul_(coefficient).neg_()
            del coefficient, log_probs
        else:
            grad_x = log_probs.exp_().mul_(grad_logprobs).neg_()
        if grad_logprobs is not None:
            local_vocab = logits.shape[-1]
            local_target, owned = _local_target_index(target_ids, vocab_start, local_vocab)
            grad_target = grad_logprobs * owned.unsqueeze(-1)
            grad_x.scatter_add_(-1, local_target.unsqueeze(-1), grad_target)
        grad_x.div_(ctx.temperature)
        return grad_x.to(logits.dtype), None, None, None, None, None, None, None, None


def _group_size_and_rank(tp_group: ProcessGroup | None) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    size = dist.get_world_size(group=tp_group)
    if size == 1:
        return 1, 0
    return size, dist.get_rank(group=tp_group)


def _padding_mask(logits: Tensor, vocab_start: int, valid_vocab_size: int | None) -> Tensor | None:
    """``[V/tp]`` bool, True at this slice's padded ids; None when the slice has no padding."""
    local_vocab = logits.shape[-1]
    if valid_vocab_size is None or valid_vocab_size >= vocab_start + local_vocab:
        return None
    global_ids = torch.arange(vocab_start, vocab_start + local_vocab, device=logits.device)
    return global_ids >= valid_vocab_size


def _local_target_index(
    target_ids: Tensor, vocab_start: int, local_vocab: int
) -> tuple[Tensor, Tensor]:
    """Index of each target in this slice (0 where not owned) and whether this slice owns it."""
    local = target_ids - vocab_start
    owned = (local >= 0) & (local < local_vocab)
    return local.masked_fill(~owned, 0), owned


def _local_target_values(shifted: Tensor, target_ids: Tensor, vocab_start: int) -> Tensor:
    """``[B, T]`` shifted logit of the target where this slice owns it, 0 elsewhere."""
    local_target, owned = _local_target_index(target_ids, vocab_start, shifted.shape[-1])
    values = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    return values.masked_fill(~owned, 0.0)


def _check_arguments(
    logits: Tensor,
    target_ids: Tensor | None,
    temperature: float,
    valid_vocab_size: int | None,
    tp_size: int,
) -> None:
    if not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(
            f"logits must be a floating tensor [..., V/tp], got {logits.dtype} "
            f"{tuple(logits.shape)}"
        )
    if target_ids is not None:
        if target_ids.dtype != torch.long:
            raise ValueError(f"target_ids must be int64, got {target_ids.dtype}")
        if tuple(target_ids.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"target_ids shape {tuple(target_ids.shape)} does not match logits shape "
                f"{tuple(logits.shape)} without its vocab dim"
            )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    padded_vocab = logits.shape[-1] * tp_size
    if valid_vocab_size is not None and not 0 < valid_vocab_size <= padded_vocab:
        raise ValueError(
            f"valid_vocab_size={valid_vocab_size} must be in [1, {padded_vocab}] (padded vocab = "
            f"{logits.shape[-1]} per rank x TP {tp_size})"
        )
