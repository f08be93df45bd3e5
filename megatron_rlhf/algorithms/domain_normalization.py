"""Per-domain running reward normalisation: ``(r - mean_d) / (std_d + eps)``.

Reward models and verifiers score different task domains (chat, math, code) on different
scales; normalising each domain by its own statistics keeps one domain from dominating the
policy gradient. "Exploring Data Scaling Trends and Effects in RLHF" (Shen et al. 2025,
ByteDance Seed) normalises reward-model scores within each task domain (their Pre-PPO prompt
selection); here the same idea is applied to the rewards of policy training, with statistics
accumulated across steps because one batch may hold only a few samples of a domain.

Statistics are exact running moments over every reward seen so far (Chan et al.'s parallel
update of count / mean / sum of squared deviations, in float64), not an exponential average.
``std`` is the unbiased (n - 1) std, 0 for a domain seen once. The batch being normalised is
added to the statistics *first*, so the first batch of a domain is normalised by its own moments.

Pure: :func:`normalize_by_domain` returns the normalised rewards and a *new*
:class:`DomainRewardStats`; the caller keeps the state (and checkpoints it: ``to_dict`` /
``from_dict``). Statistics are per process: a data-parallel trainer must feed the gathered
global batch (or all-reduce the moments) to keep ranks consistent -- not done here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from megatron_rlhf.algorithms.errors import BatchShapeError
from megatron_rlhf.algorithms.finite import check_finite
from megatron_rlhf.algorithms.groups import batch_moments, check_group_index
from megatron_rlhf.algorithms.masks import compute_dtype
from megatron_rlhf.running_moments import RunningMoments


@dataclass(frozen=True)
class DomainRewardStats:
    """Running moments per domain id. Immutable: updates return a new object."""

    moments: dict[int, RunningMoments] = field(default_factory=dict)
    """domain id -> moments of every reward of that domain seen so far."""

    def updated(self, rewards: Tensor, domain_ids: Tensor) -> DomainRewardStats:
        """New stats with ``rewards`` ``[B]`` (domains ``domain_ids`` ``[B]``) added."""
        rewards = rewards.to(torch.float64)
        domains, inverse = torch.unique(domain_ids, return_inverse=True)
        merged = dict(self.moments)
        for position, domain in enumerate(domains.tolist()):
            batch = batch_moments(rewards[inverse == position])
            addition = RunningMoments(
                count=int(batch.count[0]),
                mean=float(batch.mean[0]),
                sum_squared_deviations=float(batch.deviation.square().sum()),
            )
            merged[domain] = merged.get(domain, RunningMoments()).merge(addition)
        return DomainRewardStats(merged)

    def to_dict(self) -> dict[str, list[float]]:
        """Plain-data form for checkpoints: ``{"<domain>": [count, mean, M2]}``."""
        return {
            str(domain): [float(m.count), m.mean, m.sum_squared_deviations]
            for domain, m in self.moments.items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> DomainRewardStats:
        """Inverse of :meth:`to_dict`."""
        return cls({int(key): RunningMoments(int(v[0]), v[1], v[2]) for key, v in data.items()})


def normalize_by_domain(
    rewards: Tensor,
    domain_ids: Tensor,
    stats: DomainRewardStats,
    eps: float = 1e-6,
) -> tuple[Tensor, DomainRewardStats]:
    """Normalise each reward by the running moments of its domain, after adding this batch.

    Args:
        rewards: ``[B]`` sequence-level rewards; must be finite (raises NonFiniteError).
        domain_ids: ``[B]`` int64 domain of each sample (arbitrary integer ids).
        stats: moments accumulated over previous batches (``DomainRewardStats()`` at start).
        eps: added to the std in the denominator; > 0.

    Returns:
        ``[B]`` ``(r - mean_d) / (std_d + eps)`` in the rewards' float dtype (>= float32), and the
        updated stats. A domain whose rewards were all equal so far maps to exactly 0.
    """
    if rewards.dim() != 1:
        raise BatchShapeError(f"rewards must be [B]; got shape {tuple(rewards.shape)}")
    check_group_index(domain_ids, rewards.shape[0], "domain_ids")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    check_finite("rewards", rewards)
    new_stats = stats.updated(rewards, domain_ids)
    ids = domain_ids.tolist()
    means = torch.tensor([new_stats.moments[d].mean for d in ids], dtype=torch.float64)
    stds = torch.tensor([new_stats.moments[d].std for d in ids], dtype=torch.float64)
    means, stds = means.to(rewards.device), stds.to(rewards.device)
    normalized = (rewards.to(torch.float64) - means) / (stds + eps)
    return normalized.to(compute_dtype(rewards)), new_stats
