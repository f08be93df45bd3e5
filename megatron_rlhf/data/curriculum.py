"""Domain curricula: math and code prompts first, the other domains mixed in later.

"Exploring Data Scaling Trends and Effects in RLHF" (Shen et al. 2025, ByteDance Seed) trains on
mathematical and coding prompts in the early phase of RLHF (their fine-grained, verifiable
rewards) and mixes in the other tasks later (their Fig. 4 plots the math+code share per step).

A :class:`CurriculumConfig` is a list of phases; phase ``k`` covers the steps from the previous
phase's ``until_step`` (0 for the first) up to, not including, its own ``until_step``, and gives
relative weights per domain. The last phase may be open-ended (``until_step: None``); when it is
not, steps past its end keep its weights. ``domain_weights: None`` means every domain in
proportion to its number of prompts (the natural "all data" mixture). The shorthand
:meth:`CurriculumConfig.first_then_all` builds ``[{first domains until N}, {all, proportional}]``.

:class:`CurriculumSampler` wraps one :class:`~megatron_rlhf.data.prompts.PromptSampler` per
domain. For step ``s`` it fixes the batch's domain composition from that step's weights with a
generator seeded by ``(seed, s)`` alone:

- ``allocation="proportional"`` (default): largest-remainder quotas, ``floor(B * p_d)`` per domain
  and the remaining slots to the largest fractional parts (ties in a seeded random order), so the
  composition matches the weights as closely as an integer batch can;
- ``allocation="sample"``: each slot's domain drawn i.i.d. with probabilities ``p_d``.

Slots are then shuffled (same generator) and each slot takes the next record of its domain's
sampler. ``state_dict`` holds the step and every domain sampler's position, so a resumed run draws
exactly the batches an uninterrupted run would have.

Not guaranteed: a domain that is exhausted is not dropped; its sampler starts another epoch (a
small domain with a large weight is repeated more often).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_rlhf.config.errors import ConfigError
from megatron_rlhf.config.typed_load import dataclass_from_mapping
from megatron_rlhf.data.prompts import PromptRecord, PromptSampler

ALLOCATIONS = ("proportional", "sample")


@dataclass(frozen=True)
class CurriculumPhase:
    """One stretch of training steps with fixed domain weights."""

    until_step: int | None = None
    """First step *after* this phase (exclusive end, > the previous phase's). None: until the end
    of training (last phase only)."""
    domain_weights: Mapping[str, float] | None = None
    """Domain -> relative weight (finite, >= 0, at least one > 0). None: every domain, weighted by
    its number of prompts."""


@dataclass(frozen=True)
class CurriculumConfig:
    """An ordered list of phases (see the module docstring)."""

    phases: tuple[CurriculumPhase, ...]
    """At least one; ``until_step`` strictly increasing; only the last may be None."""
    seed: int = 0
    """Seed of the per-step batch composition."""
    allocation: str = "proportional"
    """proportional (largest-remainder quotas) or sample (i.i.d. draw per slot)."""

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a curriculum needs at least one phase")
        previous = 0
        for index, phase in enumerate(self.phases):
            _check_phase(index, phase, previous, last=index == len(self.phases) - 1)
            previous = phase.until_step if phase.until_step is not None else previous
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"curriculum allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")

    @staticmethod
    def first_then_all(
        first_domains: Sequence[str] = ("math", "code"), switch_step: int = 100, seed: int = 0,
        allocation: str = "proportional",
    ) -> CurriculumConfig:
        """Only ``first_domains`` (equal weights) before ``switch_step``, then all domains by size."""
        if not first_domains:
            raise ValueError("first_then_all needs at least one first domain")
        return CurriculumConfig(
            (CurriculumPhase(switch_step, {domain: 1.0 for domain in first_domains}), CurriculumPhase(None, None)),
            seed, allocation,
        )

    @staticmethod
    def from_mapping(raw: Any, where: str = "curriculum") -> CurriculumConfig:
        """From parsed YAML/JSON: ``{"phases": [{"until_step", "domain_weights"}, ...], "seed"?,
        "allocation"?}``, a bare list of phases, or the shorthand ``{"first_domains": [...],
        "until_step": N, "seed"?, "allocation"?}``. Typed strictly
        (:func:`~megatron_rlhf.config.typed_load.dataclass_from_mapping`): a
        :class:`~megatron_rlhf.config.errors.ConfigError` names ``where`` and the key path
        (``run.yaml: curriculum.phases[0].until_step: expected ...``)."""
        if isinstance(raw, Sequence) and not isinstance(raw, str):
            raw = {"phases": list(raw)}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a mapping or a list of phases, got {type(raw).__name__}")
        if "first_domains" not in raw:
            return dataclass_from_mapping(CurriculumConfig, raw, where)
        if "until_step" not in raw:
            raise ConfigError(f"{where}: the shorthand takes first_domains and until_step (got keys {sorted(raw)})")
        shorthand = dataclass_from_mapping(_FirstThenAll, raw, where)
        try:
            return CurriculumConfig.first_then_all(shorthand.first_domains, shorthand.until_step,
                                                   shorthand.seed, shorthand.allocation)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None

    def phase_at(self, step: int) -> CurriculumPhase:
        for phase in self.phases:
            if phase.until_step is None or step < phase.until_step:
                return phase
        return self.phases[-1]


@dataclass(frozen=True)
class _FirstThenAll:
    """The YAML shorthand of :meth:`CurriculumConfig.first_then_all`."""

    first_domains: tuple[str, ...]
    until_step: int
    seed: int = 0
    allocation: str = "proportional"


def _check_phase(index: int, phase: CurriculumPhase, previous: int, last: bool) -> None:
    where = f"curriculum phase {index}"
    if phase.until_step is None:
        if not last:
            raise ValueError(f"{where}: until_step may be None only for the last phase")
    elif isinstance(phase.until_step, bool) or not isinstance(phase.until_step, int) or phase.until_step <= previous:
        raise ValueError(f"{where}: until_step must be an integer > {previous}, got {phase.until_step!r}")
    if phase.domain_weights is None:
        return
    if not phase.domain_weights:
        raise ValueError(f"{where}: domain_weights is empty (use None for all domains by size)")
    for domain, weight in phase.domain_weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}: weight of domain {domain!r} must be a finite number >= 0, got {weight!r}")
    if not any(weight > 0 for weight in phase.domain_weights.values()):
        raise ValueError(f"{where}: at least one domain weight must be > 0")


def domain_probabilities(phase: CurriculumPhase, domain_sizes: Mapping[str, int]) -> dict[str, float]:
    """Normalised weights of ``phase`` over the known domains (sorted by name, zeros dropped)."""
    weights = phase.domain_weights if phase.domain_weights is not None else domain_sizes
    unknown = sorted(set(weights) - set(domain_sizes))
    if unknown:
        raise ValueError(f"curriculum weights name domains without prompts: {unknown} (have {sorted(domain_sizes)})")
    total = float(sum(weights.values()))
    return {domain: weights[domain] / total for domain in sorted(weights) if weights[domain] > 0}


def batch_domains(probabilities: Mapping[str, float], batch_size: int, rng: random.Random, allocation: str) -> list[str]:
    """The domain of each slot of one batch (see the module docstring)."""
    domains = list(probabilities)
    if allocation == "sample":
        return rng.choices(domains, weights=[probabilities[d] for d in domains], k=batch_size)
    quotas = {domain: batch_size * probabilities[domain] for domain in domains}
    counts = {domain: math.floor(quotas[domain] + 1e-9) for domain in domains}
    tie_order = {domain: rng.random() for domain in domains}
    remaining = batch_size - sum(counts.values())
    by_remainder = sorted(domains, key=lambda d: (-(quotas[d] - counts[d]), tie_order[d]))
    for domain in by_remainder[: max(0, remaining)]:
        counts[domain] += 1
    slots = [domain for domain in domains for _ in range(counts[domain])]
    rng.shuffle(slots)
    return slots


class CurriculumSampler:
    """Batches whose domain mix follows the curriculum at the current step."""

    def __init__(self, samplers: Mapping[str, PromptSampler], config: CurriculumConfig, batch_size: int) -> None:
        if not samplers:
            raise ValueError("a CurriculumSampler needs at least one domain sampler")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.samplers = dict(samplers)
        self.config = config
        self.batch_size = batch_size
        self.domain_sizes = {domain: len(sampler.records) for domain, sampler in self.samplers.items()}
        for phase in config.phases:
            domain_probabilities(phase, self.domain_sizes)  # unknown domains fail here, not mid-run
        self.step = 0
        """Index of the next batch."""

    @staticmethod
    def from_records(
        records: Sequence[PromptRecord], config: CurriculumConfig, batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> CurriculumSampler:
        """One PromptSampler per domain of ``records`` (seeded ``seed`` + domain name)."""
        by_domain: dict[str, list[PromptRecord]] = {}
        for record in records:
            by_domain.setdefault(record.domain, []).append(record)
        samplers = {
            domain: PromptSampler(domain_records, batch_size, seed=_domain_seed(seed, domain), shuffle=shuffle)
            for domain, domain_records in by_domain.items()
        }
        return CurriculumSampler(samplers, config, batch_size)

    def probabilities_at(self, step: int) -> dict[str, float]:
        """Domain -> share of the batch at ``step`` (for logging the curriculum)."""
        return domain_probabilities(self.config.phase_at(step), self.domain_sizes)

    def next_batch(self) -> list[PromptRecord]:
        rng = random.Random(f"curriculum:{self.config.seed}:{self.step}")
        slots = batch_domains(self.probabilities_at(self.step), self.batch_size, rng, self.config.allocation)
        taken = {domain: iter(self.samplers[domain].take(slots.count(domain))) for domain in set(slots)}
        self.step += 1
        return [next(taken[domain]) for domain in slots]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samplers": {domain: sampler.state_dict() for domain, sampler in sorted(self.samplers.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("samplers", {})
        if set(saved) != set(self.samplers):
            raise ValueError(
                f"curriculum state has domains {sorted(saved)} but this sampler has {sorted(self.samplers)}"
            )
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"curriculum state has an invalid step {step!r}")
        before = {domain: sampler.state_dict() for domain, sampler in self.samplers.items()}
        try:
            for domain, sampler in self.samplers.items():
                sampler.load_state_dict(saved[domain])
        except ValueError as error:
            for domain, sampler in self.samplers.items():  # all or nothing
                sampler.load_state_dict(before[domain])
            raise ValueError(f"curriculum state does not fit: {error}") from None
        self.step = step


def _domain_seed(seed: int, domain: str) -> int:
    return random.Random(f"domain:{seed}:{domain}").getrandbits(31)
