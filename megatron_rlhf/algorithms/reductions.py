"""Masked reductions of a ``[B, T]`` per-token loss to a scalar, selectable by name.

Registry keys (``AlgorithmConfig.loss_reduction``):

* ``"token_mean"`` -- sum over all response tokens of the batch / number of response tokens.
  Every token weighs the same, so long responses weigh more (DAPO, Yu et al. 2025, "token-level
  policy gradient loss"; OpenRLHF's default).
* ``"seq_mean_token_sum"`` -- per-sequence *sum* over its response tokens, then the mean over
  sequences. No length normalisation at all (Dr. GRPO, Liu et al. 2025, argue per-sequence length
  normalisation biases the gradient).
* ``"seq_mean_token_mean"`` -- per-sequence *mean* over its response tokens, then the mean over
  sequences. Every sequence weighs the same (the original GRPO objective, Shao et al. 2024).

Empty responses (all-zero mask rows) are *excluded* from the sequence means (they are not
counted as zero-loss sequences). A batch with no response token at all reduces to exactly 0 (not
NaN); no reduction ever divides by zero.

Every reduction is ``numerator / denominator`` (:class:`ReductionParts`). Under data or micro-batch
parallelism the global value is ``sum(numerators) / sum(denominators)`` over the shards, not the
mean of the shard values; :func:`reduction_parts` exposes both parts so a trainer can all-reduce
them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rlhf.algorithms.masks import as_bool_mask, check_token_shapes, zero_padding
from megatron_rlhf.algorithms.registry import Registry


@dataclass(frozen=True)
class ReductionParts:
    """A masked reduction as a ratio; the reduced value is ``numerator / max(denominator, 1)``
    (denominators are counts, so a zero denominator means a zero numerator)."""

    numerator: Tensor
    """``[]`` sum of per-token (or per-sequence) terms; differentiable."""
    denominator: Tensor
    """``[]`` count of tokens (token_mean) or of non-empty sequences (seq_*); no gradient."""

    def value(self) -> Tensor:
        """The reduced scalar, exactly 0 when the denominator is 0."""
        return self.numerator / self.denominator.clamp(min=1).to(self.numerator.dtype)


ReductionFn = Callable[[Tensor, Tensor], ReductionParts]
REDUCTIONS: Registry[ReductionFn] = Registry("loss reduction")


@REDUCTIONS.register("token_mean")
def token_mean_parts(values: Tensor, mask: Tensor) -> ReductionParts:
    """Sum over response tokens / number of response tokens (bool ``mask`` ``[B, T]``)."""
    masked = zero_padding(values, mask)
    return ReductionParts(masked.sum(), mask.sum())


@REDUCTIONS.register("seq_mean_token_sum")
def seq_mean_token_sum_parts(values: Tensor, mask: Tensor) -> ReductionParts:
    """Sum over sequences of per-sequence token sums / number of non-empty sequences."""
    masked = zero_padding(values, mask)
    return ReductionParts(masked.sum(), mask.any(dim=1).sum())


@REDUCTIONS.register("seq_mean_token_mean")
def seq_mean_token_mean_parts(values: Tensor, mask: Tensor) -> ReductionParts:
    """Sum over sequences of per-sequence token means / number of non-empty sequences."""
    masked = zero_padding(values, mask)
    lengths = mask.sum(dim=1)
    sequence_means = masked.sum(dim=1) / lengths.clamp(min=1).to(masked.dtype)
    return ReductionParts(sequence_means.sum(), (lengths > 0).sum())


def reduction_parts(values: Tensor, response_mask: Tensor, reduction: str) -> ReductionParts:
    """Numerator and denominator of the reduction named ``reduction`` of ``[B, T]`` ``values``.

    Padding positions of ``values`` are ignored (replaced by 0 before summing, so NaN there does
    not propagate into the value or the gradient).
    """
    mask = as_bool_mask(response_mask)
    check_token_shapes(mask, values=values)
    return REDUCTIONS.get(reduction)(values, mask)


def masked_reduce(values: Tensor, response_mask: Tensor, reduction: str) -> Tensor:
    """``[]`` the reduction named ``reduction`` of ``[B, T]`` ``values``; 0 for an empty mask."""
    return reduction_parts(values, response_mask, reduction).value()


def token_mean(values: Tensor, response_mask: Tensor) -> Tensor:
    """``[]`` mean over all response tokens of the batch; 0 if there are none."""
    return masked_reduce(values, response_mask, "token_mean")


def seq_mean_token_sum(values: Tensor, response_mask: Tensor) -> Tensor:
    """``[]`` mean over non-empty sequences of their token sums; 0 if there are none."""
    return masked_reduce(values, response_mask, "seq_mean_token_sum")


def seq_mean_token_mean(values: Tensor, response_mask: Tensor) -> Tensor:
    """``[]`` mean over non-empty sequences of their token means; 0 if there are none."""
    return masked_reduce(values, response_mask, "seq_mean_token_mean")


def masked_min_max(values: Tensor, response_mask: Tensor, empty: float) -> tuple[Tensor, Tensor]:
    """``[]`` min and max of ``values`` over response tokens; both ``empty`` if there are none."""
    mask = as_bool_mask(response_mask)
    check_token_shapes(mask, values=values)
    values = values.detach()
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    fallback = torch.tensor(empty, dtype=values.dtype, device=values.device)
    has_tokens = mask.any()
    low = torch.where(mask, values, inf).amin() if values.numel() else inf
    high = torch.where(mask, values, -inf).amax() if values.numel() else -inf
    return torch.where(has_tokens, low, fallback), torch.where(has_tokens, high, fallback)
