"""Per-domain running reward normalisation against statistics over all rewards seen."""

from __future__ import annotations

import statistics

import pytest
import torch

from megatron_rlhf.algorithms import DomainRewardStats, RunningMoments, normalize_by_domain


def test_running_moments_equal_statistics_over_every_batch_seen() -> None:
    generator = torch.Generator().manual_seed(0)
    stats = DomainRewardStats()
    seen: dict[int, list[float]] = {}
    for step in range(6):
        domain_ids = torch.randint(0, 3, (7,), generator=generator) * 10
        rewards = torch.randn(7, generator=generator, dtype=torch.float64) * (1 + step)
        for domain, reward in zip(domain_ids.tolist(), rewards.tolist()):
            seen.setdefault(domain, []).append(reward)
        normalized, stats = normalize_by_domain(rewards, domain_ids, stats, eps=1e-6)
        for index, (domain, reward) in enumerate(zip(domain_ids.tolist(), rewards.tolist())):
            values = seen[domain]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            expected = (reward - statistics.fmean(values)) / (std + 1e-6)
            assert normalized[index].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    for domain, values in seen.items():
        assert stats.moments[domain].count == len(values)
        assert stats.moments[domain].mean == pytest.approx(statistics.fmean(values), rel=1e-12)


def test_input_stats_are_not_mutated() -> None:
    before = DomainRewardStats({1: RunningMoments(2, 0.5, 0.5)})
    _, after = normalize_by_domain(torch.tensor([3.0]), torch.tensor([1]), before)
    assert before.moments[1].count == 2 and after.moments[1].count == 3


def test_constant_domain_and_first_single_sample_give_exactly_zero() -> None:
    stats = DomainRewardStats()
    for _ in range(3):
        normalized, stats = normalize_by_domain(
            torch.tensor([0.1, 0.1, 7.0]), torch.tensor([0, 0, 1]), stats
        )
        assert torch.equal(normalized[:2], torch.zeros(2))
    first, _ = normalize_by_domain(torch.tensor([4.0]), torch.tensor([9]), DomainRewardStats())
    assert first.item() == 0.0


def test_checkpoint_round_trip() -> None:
    _, stats = normalize_by_domain(
        torch.tensor([1.0, 2.0, 5.0]), torch.tensor([0, 0, 3]), DomainRewardStats()
    )
    assert DomainRewardStats.from_dict(stats.to_dict()) == stats


def test_float_domain_ids_rejected_with_name() -> None:
    with pytest.raises(ValueError, match="domain_ids must be an integer tensor"):
        normalize_by_domain(torch.zeros(2), torch.zeros(2), DomainRewardStats())
