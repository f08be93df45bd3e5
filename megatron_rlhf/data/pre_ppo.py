"""Pre-PPO prompt selection: keep the prompts the SFT policy does worst on, per domain.

"Exploring Data Scaling Trends and Effects in RLHF" (Shen et al. 2025, ByteDance Seed, Sec. Pre-PPO):
before RL, sample responses to each candidate prompt from the SFT policy and score them with the
reward model; prompts with *low* scores are the challenging ones, less prone to reward hacking.
Score distributions differ between task domains, so scores are normalised within each domain
before selecting; the selected prompts are then combined with the original training set.

Steps (each a pure function here; :func:`pre_ppo_select` chains them):

1. :func:`aggregate_prompt_scores`: ``[P, n]`` response scores -> ``[P]`` prompt scores
   (``mean`` by default, or ``min``/``max``). Rows may have different lengths (>= 1 each); every
   score must be finite.
2. :func:`normalize_within_domains`: z-score ``(s - mean_d) / std_d`` with the population
   (``ddof=0``) std of the prompt's domain; a domain whose scores are all equal gets 0.
3. :func:`select_lowest`: keep ``ceil(keep_fraction * N)`` lowest normalised scores, where N is
   the size of each domain (``scope="per_domain"``) or of the whole set (``scope="global"``).
   Ties are broken by input position (earlier first), so the selection is deterministic.
4. :func:`merge_selection`: ``selected_only`` returns the selected prompts; ``union`` returns the
   original set followed by ``upweight_copies`` extra copies of each selected prompt (the hard
   prompts are upweighted, nothing is dropped). The original set defaults to the candidates.

:func:`select_prompts` is the thin driver: it calls a sampling function and a scoring function
on chunks of prompts and hands the scores to :func:`pre_ppo_select`.

Not guaranteed: nothing here guards against a reward model that scores hard prompts *high*
(the method assumes the RM's score tracks response quality); selection is per process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from megatron_rlhf.data.prompts import PromptRecord

AGGREGATIONS = ("mean", "min", "max")
SCOPES = ("per_domain", "global")
MERGE_MODES = ("selected_only", "union")

SampleFn = Callable[[Sequence[PromptRecord], int], Sequence[Sequence[str]]]
"""(prompts, n) -> n responses per prompt, ``[P][n]`` strings (e.g. the SFT policy in vLLM)."""
ScoreFn = Callable[[Sequence[PromptRecord], Sequence[Sequence[str]]], Sequence[Sequence[float]]]
"""(prompts, responses [P][n]) -> reward-model scores ``[P][n]``."""


@dataclass(frozen=True)
class PrePPOConfig:
    """Which prompts Pre-PPO keeps and how they are merged with the original set."""

    keep_fraction: float = 0.5
    """Fraction of prompts kept, the lowest-scoring ones (of each domain or overall). In (0, 1]."""
    scope: str = "per_domain"
    """per_domain: keep the fraction of every domain; global: of the whole set, ranked by the
    domain-normalised score."""
    merge: str = "union"
    """selected_only: train on the selected prompts; union: the original set plus
    ``upweight_copies`` copies of each selected prompt."""
    upweight_copies: int = 1
    """Extra copies of each selected prompt appended in ``union`` mode (1: a selected prompt
    appears twice in total). >= 1."""
    aggregate: str = "mean"
    """How one prompt's response scores become its score: mean, min or max."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt by :func:`select_prompts`. >= 1."""
    chunk_size: int = 256
    """Prompts per call of the sampling and scoring functions in :func:`select_prompts`. >= 1."""

    def __post_init__(self) -> None:
        if not (isinstance(self.keep_fraction, (int, float)) and 0 < self.keep_fraction <= 1):
            raise ValueError(f"pre_ppo keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("merge", self.merge, MERGE_MODES)
        _check_choice("aggregate", self.aggregate, AGGREGATIONS)
        for name in ("upweight_copies", "samples_per_prompt", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"pre_ppo {name} must be a positive integer, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"pre_ppo {name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class DomainSelection:
    """Selection statistics of one domain."""

    candidates: int
    selected: int
    mean_score: float
    """Mean prompt score of the domain before normalisation."""
    std_score: float
    """Population std of the domain's prompt scores."""


@dataclass(frozen=True)
class PrePPOResult:
    prompt_scores: tuple[float, ...]
    """[P] aggregated RM score of each candidate prompt."""
    normalized_scores: tuple[float, ...]
    """[P] the score z-normalised within the prompt's domain."""
    selected: tuple[int, ...]
    """Indices of the selected (hardest) candidates, in input order."""
    merged: list[PromptRecord]
    """The training set after merging (see ``PrePPOConfig.merge``)."""
    domains: Mapping[str, DomainSelection]


def aggregate_prompt_scores(
    response_scores: Sequence[Sequence[float]], aggregate: str = "mean", ids: Sequence[str] | None = None
) -> list[float]:
    """``[P, n]`` -> ``[P]``; ValueError naming the prompt (``ids[i]`` or its index) on an empty
    row or a non-finite score."""
    _check_choice("aggregate", aggregate, AGGREGATIONS)
    prompt_scores = []
    for index, row in enumerate(response_scores):
        name = repr(ids[index]) if ids is not None else f"#{index}"
        values = [float(score) for score in row]
        if not values:
            raise ValueError(f"prompt {name} has no response scores")
        if not all(math.isfinite(value) for value in values):
            raise ValueError(f"prompt {name} has a non-finite response score: {values}")
        if aggregate == "mean":
            prompt_scores.append(math.fsum(values) / len(values))
        else:
            prompt_scores.append(min(values) if aggregate == "min" else max(values))
    return prompt_scores


def domain_moments(prompt_scores: Sequence[float], domains: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Domain -> (mean, population std) of its prompt scores."""
    _check_lengths(prompt_scores, domains)
    by_domain: dict[str, list[float]] = {}
    for score, domain in zip(prompt_scores, domains):
        by_domain.setdefault(domain, []).append(float(score))
    moments = {}
    for domain, values in by_domain.items():
        mean = math.fsum(values) / len(values)
        moments[domain] = (mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values)))
    return moments


def normalize_within_domains(prompt_scores: Sequence[float], domains: Sequence[str]) -> list[float]:
    """z-score of each prompt score within its domain (0 where the domain's std is 0)."""
    moments = domain_moments(prompt_scores, domains)
    normalized = []
    for score, domain in zip(prompt_scores, domains):
        mean, std = moments[domain]
        normalized.append(0.0 if std <= 1e-12 * max(1.0, abs(mean)) else (float(score) - mean) / std)
    return normalized


def keep_count(size: int, keep_fraction: float) -> int:
    """``ceil(keep_fraction * size)`` (robust to float round-off); at least 1 when size > 0."""
    if size == 0:
        return 0
    return max(1, min(size, math.ceil(keep_fraction * size - 1e-9)))


def select_lowest(
    normalized_scores: Sequence[float], domains: Sequence[str], keep_fraction: float, scope: str = "per_domain"
) -> list[int]:
    """Indices (in input order) of the lowest-scoring prompts; see the module docstring."""
    _check_lengths(normalized_scores, domains)
    _check_choice("scope", scope, SCOPES)
    if scope == "global":
        groups = {"": list(range(len(domains)))}
    else:
        groups = {}
        for index, domain in enumerate(domains):
            groups.setdefault(domain, []).append(index)
    selected: list[int] = []
    for members in groups.values():
        ranked = sorted(members, key=lambda index: (normalized_scores[index], index))
        selected.extend(ranked[: keep_count(len(members), keep_fraction)])
    return sorted(selected)


def merge_selection(
    candidates: Sequence[PromptRecord],
    selected: Sequence[int],
    merge: str = "union",
    upweight_copies: int = 1,
    original: Sequence[PromptRecord] | None = None,
) -> list[PromptRecord]:
    """The training set: ``selected_only`` or ``union`` (original + copies of the selected)."""
    _check_choice("merge", merge, MERGE_MODES)
    chosen = [candidates[index] for index in selected]
    if merge == "selected_only":
        return chosen
    base = list(candidates if original is None else original)
    return base + [record for _ in range(upweight_copies) for record in chosen]


def pre_ppo_select(
    candidates: Sequence[PromptRecord],
    response_scores: Sequence[Sequence[float]],
    config: PrePPOConfig,
    original: Sequence[PromptRecord] | None = None,
) -> PrePPOResult:
    """Steps 1-4 of the module docstring on precomputed ``[P, n]`` scores."""
    if len(response_scores) != len(candidates):
        raise ValueError(f"got scores for {len(response_scores)} prompts but {len(candidates)} candidate prompts")
    domains = [record.domain for record in candidates]
    prompt_scores = aggregate_prompt_scores(response_scores, config.aggregate, [r.id for r in candidates])
    normalized = normalize_within_domains(prompt_scores, domains)
    selected = select_lowest(normalized, domains, config.keep_fraction, config.scope)
    merged = merge_selection(candidates, selected, config.merge, config.upweight_copies, original)
    moments = domain_moments(prompt_scores, domains)
    selected_per_domain: dict[str, int] = {}
    for index in selected:
        selected_per_domain[domains[index]] = selected_per_domain.get(domains[index], 0) + 1
    stats = {
        domain: DomainSelection(domains.count(domain), selected_per_domain.get(domain, 0), mean, std)
        for domain, (mean, std) in moments.items()
    }
    return PrePPOResult(tuple(prompt_scores), tuple(normalized), tuple(selected), merged, stats)


def select_prompts(
    prompts: Sequence[PromptRecord],
    sample_fn: SampleFn,
    score_fn: ScoreFn,
    config: PrePPOConfig,
    original: Sequence[PromptRecord] | None = None,
) -> PrePPOResult:
    """Sample ``config.samples_per_prompt`` responses per prompt, score them, select and merge."""
    response_scores: list[Sequence[float]] = []
    for start in range(0, len(prompts), config.chunk_size):
        chunk = list(prompts[start : start + config.chunk_size])
        responses = sample_fn(chunk, config.samples_per_prompt)
        if len(responses) != len(chunk):
            raise ValueError(f"sample_fn returned responses for {len(responses)} of {len(chunk)} prompts")
        scores = score_fn(chunk, responses)
        if len(scores) != len(chunk):
            raise ValueError(f"score_fn returned scores for {len(scores)} of {len(chunk)} prompts")
        for record, row, row_responses in zip(chunk, scores, responses):
            if len(row) != len(row_responses):
                raise ValueError(
                    f"score_fn returned {len(row)} scores for the {len(row_responses)} responses of prompt {record.id!r}"
                )
        response_scores.extend(scores)
    return pre_ppo_select(prompts, response_scores, config, original)


def _check_lengths(scores: Sequence[float], domains: Sequence[str]) -> None:
    if len(scores) != len(domains):
        raise ValueError(f"{len(scores)} scores but {len(domains)} domain tags")
