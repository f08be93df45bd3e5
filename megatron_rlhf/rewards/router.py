"""Hybrid reward router: per-sample routing by domain to weighted reward sources (ByteDance Seed).

Each domain (math, code, instruction following, general chat, ...) names one or more sources with
a weight, e.g. math -> {math verifier: 1.0, Bradley-Terry RM: 0.5}. For one batch the router calls
every source once with all the samples routed to it (sources run concurrently), then per sample:

1. if any of its sources returned INFRA_ERROR, the sample is INFRA_ERROR (reward None, excluded
   from the update, counted by the :class:`InfraErrorGuard`, which stops the run above the rate);
2. otherwise each source's reward is normalised per (domain, source): ``none``, ``batch_zscore``
   (mean/std of this batch's rewards of that domain) or ``running_zscore`` (running mean/variance
   of everything seen so far, updated with this batch first; population std);
3. the weighted sum is clipped to the domain's ``clip`` range (the weighted sum of the raw,
   unnormalised, unclipped rewards is kept as ``RewardResult.raw_score``, and each source's raw
   reward as ``RewardResult.source_rewards``, for metrics and plots);
4. status: FAILED_VERIFICATION if any source failed the sample, else SCORED; verdict and detail
   come from the domain's first source (the others' details are appended); step rewards are the
   weighted sum of those of the sources that have them.

Streaming (:mod:`.streaming`): the sources' calls may instead be made as samples arrive, and the
batch combined with :meth:`HybridRewardRouter.combine` once all have been scored; the results are
those of :meth:`~HybridRewardRouter.score` on the whole batch, since normalisation, clipping and
the infra-error window only ever see the whole batch.

The learned sources (RM, PRM, GenRM) plug in as any :class:`RewardSource` under a name.

State: the running moments and the infra-error window change later rewards; :meth:`HybridRewardRouter.state_dict`
/ :meth:`~HybridRewardRouter.load_state_dict` carry them through a checkpoint (the RL loop saves them
with the train state). Sources keep no state that changes a reward.
"""

from __future__ import annotations

import concurrent.futures
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from megatron_rlhf.running_moments import RunningMoments
from megatron_rlhf.config.errors import UserError
from megatron_rlhf.rewards.interface import (
    InfraErrorGuard,
    InfraErrorPolicy,
    InfraErrorRateExceeded,
    RewardSource,
)
from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus

NORMALIZATIONS = ("none", "batch_zscore", "running_zscore")
EPSILON = 1e-6


@dataclass(frozen=True)
class DomainRoute:
    sources: Mapping[str, float]
    """Source name -> weight of its (normalised) reward. At least one; weights finite."""
    normalization: str = "none"
    """none | batch_zscore | running_zscore, applied to each source's rewards of this domain."""
    clip: tuple[float, float] | None = None
    """(low, high) bounds of the combined reward; None: no clipping."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("a domain route needs at least one source")
        for name, weight in self.sources.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of source {name!r} must be a finite number, got {weight!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.clip is not None and not (len(self.clip) == 2 and self.clip[0] < self.clip[1]):
            raise ValueError(f"clip must be [low, high] with low < high, got {self.clip!r}")


@dataclass(frozen=True)
class RouterConfig:
    domains: Mapping[str, DomainRoute]
    """Domain tag -> route. At least one."""
    infra_errors: InfraErrorPolicy = field(default_factory=InfraErrorPolicy)
    fallback_domain: str | None = None
    """Route used for samples whose domain is not listed; None: such a sample is an error."""

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("the router needs at least one domain")
        if self.fallback_domain is not None and self.fallback_domain not in self.domains:
            raise ValueError(f"fallback_domain {self.fallback_domain!r} is not one of the domains {sorted(self.domains)}")


class UnroutableSample(UserError):
    """A sample whose domain has no route (and no fallback is configured)."""


def route_domain(config: RouterConfig, sample: RewardSample) -> str:
    """The domain whose route scores ``sample``; raises UnroutableSample naming the sample."""
    if sample.domain in config.domains:
        return sample.domain
    if config.fallback_domain is not None:
        return config.fallback_domain
    raise UnroutableSample(
        f"sample {sample.sample_id!r}: domain {sample.domain!r} has no reward route; configured "
        f"domains: {', '.join(sorted(config.domains))}"
    )


class HybridRewardRouter:
    """Routes samples to sources by domain and combines their rewards (see the module docstring)."""

    name = "router"

    def __init__(self, config: RouterConfig, sources: Mapping[str, RewardSource]) -> None:
        for domain, route in config.domains.items():
            missing = [name for name in route.sources if name not in sources]
            if missing:
                raise ValueError(f"domain {domain!r} uses unknown source(s) {missing}; configured: {sorted(sources)}")
        self.config = config
        self.sources = dict(sources)
        self.guard = InfraErrorGuard(config.infra_errors)
        self._moments: dict[tuple[str, str], RunningMoments] = {}
        self.last_update_mask: list[bool] = []

    def route(self, sample: RewardSample) -> str:
        return route_domain(self.config, sample)

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        """Combined results; also sets :attr:`last_update_mask`. Raises InfraErrorRateExceeded."""
        domains = [self.route(sample) for sample in samples]
        per_source: dict[str, list[int]] = {}
        for index, domain in enumerate(domains):
            for name in self.config.domains[domain].sources:
                per_source.setdefault(name, []).append(index)
        raw: dict[str, dict[int, RewardResult]] = {}
        with concurrent.futures.ThreadPoolExecutor(max(len(per_source), 1)) as pool:
            futures = {
                name: pool.submit(self.sources[name].score, [samples[i] for i in indices])
                for name, indices in per_source.items()
            }
            for name, future in futures.items():
                results = future.result()
                if len(results) != len(per_source[name]):
                    raise RuntimeError(f"source {name!r} returned {len(results)} results for {len(per_source[name])} samples")
                raw[name] = dict(zip(per_source[name], results))
        return self.combine(domains, raw)

    def combine(self, domains: Sequence[str], raw: Mapping[str, Mapping[int, RewardResult]]) -> list[RewardResult]:
        """Step 2 onwards of the module docstring for a whole batch: ``domains[i]`` is sample
        ``i``'s routed domain, ``raw[source][i]`` its source's result (every source of its route).
        Updates the running moments and the infra-error window, as :meth:`score` does (which is
        ``combine`` of its sources' concurrent results); also sets :attr:`last_update_mask`."""
        domains = list(domains)
        raw = {name: dict(results) for name, results in raw.items()}
        normalized = self._normalize(domains, raw)
        combined = [self._combine(i, domains[i], raw, normalized) for i in range(len(domains))]
        try:
            self.last_update_mask = self.guard.observe(combined)
        except InfraErrorRateExceeded as stop:
            stop.results = combined  # what this batch got, for callers that report before stopping
            raise
        return combined

    def _normalize(self, domains: list[str], raw: dict[str, dict[int, RewardResult]]) -> dict[tuple[str, int], float]:
        normalized: dict[tuple[str, int], float] = {}
        for domain, route in self.config.domains.items():
            for name in route.sources:
                rewards = {
                    i: result.reward for i, result in raw.get(name, {}).items()
                    if domains[i] == domain and result.reward is not None
                }
                if not rewards:
                    continue
                values = list(rewards.values())
                if route.normalization == "none":
                    mean, std = 0.0, 1.0
                elif route.normalization == "batch_zscore":
                    mean = sum(values) / len(values)
                    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
                else:
                    moments = self._moments.get((domain, name), RunningMoments()).added(values)
                    self._moments[(domain, name)] = moments
                    mean, std = moments.mean, moments.population_std
                scale = 1.0 if route.normalization == "none" else 1.0 / (std + EPSILON)
                for i, value in rewards.items():
                    normalized[(name, i)] = (value - mean) * scale
        return normalized

    def _combine(self, index: int, domain: str, raw: dict[str, dict[int, RewardResult]],
                 normalized: dict[tuple[str, int], float]) -> RewardResult:
        route = self.config.domains[domain]
        results = [(name, weight, raw[name][index]) for name, weight in route.sources.items()]
        seconds = max(result.seconds for _, _, result in results)
        details = [f"{name}: {result.detail}" for name, _, result in results if result.detail]
        detail = "; ".join(details) if len(results) > 1 else results[0][2].detail
        failed = [(name, result) for name, _, result in results if result.status is RewardStatus.INFRA_ERROR]
        if failed:
            name, result = failed[0]
            return RewardResult.infra_error(result.verdict, f"{name}: {result.detail}", seconds)
        reward = sum(weight * normalized[(name, index)] for name, weight, _ in results)
        raw_score = sum(weight * result.reward for _, weight, result in results)
        if route.clip is not None:
            reward = min(max(reward, route.clip[0]), route.clip[1])
        failing = [r for _, _, r in results if r.status is RewardStatus.FAILED_VERIFICATION]
        status = RewardStatus.FAILED_VERIFICATION if failing else RewardStatus.SCORED
        verdict = failing[0].verdict if failing else results[0][2].verdict
        return RewardResult(reward, status, verdict, detail, seconds, _combined_steps(results), raw_score,
                            tuple((name, float(result.reward)) for name, _, result in results))

    def state_dict(self) -> dict:
        """What the next batches' rewards depend on, as plain data: the ``running_zscore`` moments
        per (domain, source) and the infra-error window. Restored exactly by :meth:`load_state_dict`."""
        return {
            "moments": [[domain, name, *moments.to_list()] for (domain, name), moments in sorted(self._moments.items())],
            "infra_errors": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (a resumed run scores as the uninterrupted one would)."""
        self._moments = {(str(row[0]), str(row[1])): RunningMoments.from_list(row[2:]) for row in state["moments"]}
        self.guard.load_state_dict(state["infra_errors"])

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def _combined_steps(results: list[tuple[str, float, RewardResult]]) -> tuple[float, ...] | None:
    with_steps = [(name, weight, r.step_rewards) for name, weight, r in results if r.step_rewards is not None]
    if not with_steps:
        return None
    length = len(with_steps[0][2])
    if any(len(steps) != length for _, _, steps in with_steps):
        raise RuntimeError(f"sources {[n for n, _, _ in with_steps]} returned step rewards of different lengths")
    return tuple(sum(weight * steps[k] for _, weight, steps in with_steps) for k in range(length))
