"""Classification metrics of reward models: pairwise accuracy and ROC AUC.

- :func:`pairwise_accuracy`: the fraction of preference pairs whose chosen response scores above
  the rejected one; an exact tie counts one half (a constant scorer gets 0.5, not 0 or 1).
- :func:`roc_auc`: the probability that a random positive scores above a random negative, ties
  counting one half (the Mann-Whitney U statistic over the average ranks), so it is exact for
  any number of tied scores and needs no threshold sweep. It is ``None`` when the labels hold
  only one class (AUC is undefined there).

Both are pure functions of 1-D tensors (any float dtype; computed in float64) and reject
mismatched shapes, empty inputs and non-finite scores with a ``ValueError`` naming the problem.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_scores(name: str, scores: Tensor) -> Tensor:
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} holds NaN or Inf")
    return scores.detach().to(torch.float64).cpu()


def pairwise_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> float:
    """Mean over pairs of ``1[chosen > rejected] + 0.5 * 1[chosen == rejected]``."""
    chosen = _check_scores("chosen_scores", chosen_scores)
    rejected = _check_scores("rejected_scores", rejected_scores)
    if chosen.shape != rejected.shape:
        raise ValueError(f"{tuple(chosen.shape)} chosen scores vs {tuple(rejected.shape)} rejected")
    wins = (chosen > rejected).to(torch.float64) + 0.5 * (chosen == rejected).to(torch.float64)
    return float(wins.mean())


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values`` (1-D), tied values sharing the mean of their ranks."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # last 1-based rank of each tie group
    group_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = group_rank[inverse]
    return ranks


def roc_auc(scores: Tensor, labels: Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (0/1 or bool); ``None`` if
    the labels are all one class."""
    values = _check_scores("scores", scores)
    if labels.shape != scores.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != scores shape {tuple(scores.shape)}")
    labels = labels.detach().cpu()
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    positive = labels.to(torch.bool)
    num_positive = int(positive.sum())
    num_negative = positive.numel() - num_positive
    if num_positive == 0 or num_negative == 0:
        return None
    rank_sum = float(average_ranks(values)[positive].sum())
    u_statistic = rank_sum - num_positive * (num_positive + 1) / 2
    return u_statistic / (num_positive * num_negative)
