"""Best-of-N evaluation of reward models (the GLM "Does RLHF Scale?" study, appendix A.1).

For each prompt the policy samples ``N_max`` responses (one engine call, ``n = N_max``); a verifier
grades every response; each scorer (ORM, PRM with an aggregate, GenRM, random, ...) scores every
response; for ``N = 1, 2, 4, ..., N_max`` the response with the best score among the FIRST ``N``
samples is picked and its grade counts. Reported next to each scorer: the oracle (pass@N: any of
the first N correct) and random choice (the expected accuracy of picking one of the first N
uniformly, i.e. their mean correctness), the ceiling and the floor a reward model sits between.

Selection (:func:`best_of_n_accuracy`) is a pure function of ``scores [P, N]`` and ``correct
[P, N]``. Ties at the best score are resolved in expectation: a prompt counts the fraction of its
tied best responses that are correct (so a constant scorer scores exactly random choice, and a
perfect one exactly pass@N). A NaN score (a response the scorer could not score) never wins unless
every score of the prompt is NaN, which then ties all N.

Guarantees: one engine call per chunk of prompts; prompts the engine dropped (too long, empty)
are left out and counted; a response the verifier could not grade (INFRA_ERROR) counts as not
correct and is counted. Not guaranteed: accuracies are estimates over the prompts given (their
standard error is about ``sqrt(a (1 - a) / P)``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus

ResponseScorer = Callable[[Sequence[RewardSample]], list[float]]
"""Scores responses: one float per sample (higher is better; NaN: could not score)."""
STEP_AGGREGATES = ("outcome", "last", "min", "product", "mean")


def bon_sizes(n_max: int) -> list[int]:
    """1, 2, 4, ... up to ``n_max``, with ``n_max`` itself last."""
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
        raise ValueError(f"N_max must be a positive integer, got {n_max!r}")
    sizes = [1 << power for power in range(n_max.bit_length()) if 1 << power <= n_max]
    return sizes if sizes[-1] == n_max else sizes + [n_max]


def _check(scores: torch.Tensor, correct: torch.Tensor, sizes: Sequence[int]) -> None:
    if scores.dim() != 2 or scores.shape != correct.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and correct {tuple(correct.shape)} must both be [P, N]")
    if any(not 1 <= size <= scores.shape[1] for size in sizes):
        raise ValueError(f"sizes {list(sizes)} must lie in 1..{scores.shape[1]}")


def best_of_n_accuracy(scores: torch.Tensor, correct: torch.Tensor, sizes: Sequence[int]) -> list[float]:
    """Accuracy of picking the best-scored of the first ``N`` responses, per ``N`` in ``sizes``.

    ``scores``: [P, N_max] float (NaN: unscorable); ``correct``: [P, N_max] bool. Ties at the best
    score count the fraction of tied responses that are correct (see the module docstring).
    """
    _check(scores, correct, sizes)
    scores = torch.nan_to_num(scores.double(), nan=-math.inf)
    correct = correct.bool()
    accuracies = []
    for size in sizes:
        window, graded = scores[:, :size], correct[:, :size]
        best = window.max(dim=1, keepdim=True).values
        tied = window == best
        tied_correct = (tied & graded).sum(dim=1).double() / tied.sum(dim=1).double()
        accuracies.append(float(tied_correct.mean()) if len(tied_correct) else float("nan"))
    return accuracies


def pass_at_n(correct: torch.Tensor, sizes: Sequence[int]) -> list[float]:
    """Oracle accuracy: the fraction of prompts with a correct response among the first ``N``."""
    _check(correct.double(), correct, sizes)
    return [float(correct[:, :size].bool().any(dim=1).double().mean()) for size in sizes]


def random_choice_accuracy(correct: torch.Tensor, sizes: Sequence[int]) -> list[float]:
    """Expected accuracy of a uniformly random pick among the first ``N`` (their mean correctness)."""
    _check(correct.double(), correct, sizes)
    return [float(correct[:, :size].double().mean()) for size in sizes]


# -- scorers -------------------------------------------------------------------------------------


def aggregate_result(result: RewardResult, aggregate: str = "outcome") -> float:
    """One score from a reward result: NaN for INFRA_ERROR; ``outcome`` is ``reward``; ``last``,
    ``min``, ``product``, ``mean`` combine a PRM's ``step_rewards`` (``reward`` when it has none)."""
    if aggregate not in STEP_AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} (choose {STEP_AGGREGATES})")
    if result.status is RewardStatus.INFRA_ERROR or result.reward is None:
        return math.nan
    steps = result.step_rewards
    if aggregate == "outcome" or not steps:
        return float(result.reward)
    if aggregate == "min":
        return float(min(steps))
    if aggregate == "mean":
        return float(sum(steps) / len(steps))
    if aggregate == "last":
        return float(steps[-1])
    return float(math.prod(steps))


def source_scorer(source: Any, aggregate: str = "outcome") -> ResponseScorer:
    """A scorer from any :class:`~megatron_rlhf.rewards.interface.RewardSource` (ORM, PRM, GenRM, verifier)."""
    if aggregate not in STEP_AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} (choose {STEP_AGGREGATES})")

    def score(samples: Sequence[RewardSample]) -> list[float]:
        return [aggregate_result(result, aggregate) for result in source.score(samples)]

    return score


def precomputed_scorer(scores: Mapping[str, float]) -> ResponseScorer:
    """A scorer reading scores computed elsewhere (e.g. in a reward model's own processes) by
    ``sample_id``; NaN for a response it has no score for."""
    return lambda samples: [float(scores.get(sample.sample_id, math.nan)) for sample in samples]


def random_scorer(seed: int = 0) -> ResponseScorer:
    """Independent uniform scores: an actual random choice (sampled, unlike :func:`random_choice_accuracy`)."""
    generator = random.Random(seed)
    return lambda samples: [generator.random() for _ in samples]


# -- the evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BestOfNConfig:
    n_max: int = 16
    """Responses sampled per prompt; N runs over 1, 2, 4, ..., n_max. >= 1."""
    temperature: float = 0.9
    """Policy sampling temperature (the GLM study uses 0.9). > 0."""
    top_p: float = 1.0
    max_new_tokens: int = 512
    """Longest response, in tokens. >= 1."""
    chat_template: bool = True
    """Render a plain prompt as one user message with the chat template (False: raw text)."""
    prompts_per_call: int = 64
    """Prompts per engine call (and per scorer call). >= 1."""
    seed: int | None = None
    """Per-request sampling seed (None: the engine's seeded stream)."""

    def __post_init__(self) -> None:
        bon_sizes(self.n_max)
        for name in ("max_new_tokens", "prompts_per_call"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"best-of-N {name} must be a positive integer, got {value!r}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature!r} must be > 0 and top_p={self.top_p!r} in (0, 1]")


@dataclass
class BestOfNReport:
    sizes: list[int]
    oracle: list[float]
    """pass@N per size."""
    random_choice: list[float]
    """Expected accuracy of a random pick per size."""
    scorers: dict[str, list[float]]
    """Scorer name -> best-of-N accuracy per size."""
    prompts: int
    """Prompts evaluated (after the engine's drops)."""
    prompts_dropped: int = 0
    grading_errors: int = 0
    """Responses the verifier could not grade (counted as not correct)."""
    unscored: dict[str, int] = field(default_factory=dict)
    """Scorer name -> responses it returned NaN for."""


@dataclass
class SampledResponses:
    samples: list[list[RewardSample]]
    """[P][N_max] responses of the kept prompts."""
    correct: torch.Tensor
    """[P, N_max] bool: the verifier graded the response correct."""
    prompts_dropped: int
    grading_errors: int


def sample_and_grade(engine: Any, prompts: Sequence[Any], verifier: Any, config: BestOfNConfig) -> SampledResponses:
    """Sample ``n_max`` responses per prompt (PromptRecord-like: id, domain, prompt text,
    ground_truth) and grade them with ``verifier``."""
    from megatron_rlhf.config.sampling import SamplingSettings

    settings = SamplingSettings(n=config.n_max, temperature=config.temperature, top_p=config.top_p,
                                max_new_tokens=config.max_new_tokens, seed=config.seed)
    kept: list[list[RewardSample]] = []
    grades: list[list[bool]] = []
    dropped = errors = 0
    for start in range(0, len(prompts), config.prompts_per_call):
        chunk = prompts[start : start + config.prompts_per_call]
        inputs = [record.engine_input(config.chat_template) for record in chunk]
        batch = engine.generate(inputs, settings)
        by_prompt: dict[int, list[RewardSample]] = {}
        for index, text in zip(batch.prompt_index.tolist(), batch.texts(engine.tokenizer)):
            record = chunk[index]
            group = by_prompt.setdefault(index, [])
            group.append(RewardSample(sample_id=f"{start + index}:{record.id}/{len(group)}", domain=record.domain,
                                      prompt=record.text, response=text, ground_truth=record.ground_truth,
                                      metadata={"id": record.id, "sample": len(group)}))
        dropped += len(chunk) - len(by_prompt)
        flat = [sample for index in sorted(by_prompt) for sample in by_prompt[index]]
        results = verifier.score(flat)
        if len(results) != len(flat):
            raise RuntimeError(f"the verifier returned {len(results)} results for {len(flat)} responses")
        errors += sum(result.status is RewardStatus.INFRA_ERROR for result in results)
        passed = iter([result.passed for result in results])
        for index in sorted(by_prompt):
            kept.append(by_prompt[index])
            grades.append([next(passed) for _ in by_prompt[index]])
    correct = torch.tensor(grades, dtype=torch.bool) if grades else torch.zeros((0, config.n_max), dtype=torch.bool)
    return SampledResponses(kept, correct, dropped, errors)


def score_responses(responses: SampledResponses, scorer: ResponseScorer, chunk: int = 256) -> torch.Tensor:
    """[P, N_max] float scores of every sampled response (NaN where the scorer could not score)."""
    flat = [sample for group in responses.samples for sample in group]
    values: list[float] = []
    for start in range(0, len(flat), chunk):
        part = flat[start : start + chunk]
        scores = list(scorer(part))
        if len(scores) != len(part):
            raise ValueError(f"a scorer returned {len(scores)} scores for {len(part)} responses")
        values.extend(float(value) for value in scores)
    return torch.tensor(values, dtype=torch.float64).reshape(responses.correct.shape)


def evaluate_best_of_n(responses: SampledResponses, scorers: Mapping[str, ResponseScorer]) -> BestOfNReport:
    """Best-of-N curves of every scorer over the same sampled, graded responses."""
    sizes = bon_sizes(responses.correct.shape[1])
    report = BestOfNReport(sizes, pass_at_n(responses.correct, sizes), random_choice_accuracy(responses.correct, sizes),
                           {}, int(responses.correct.shape[0]), responses.prompts_dropped, responses.grading_errors)
    for name, scorer in scorers.items():
        scores = score_responses(responses, scorer)
        report.scorers[name] = best_of_n_accuracy(scores, responses.correct, sizes)
        report.unscored[name] = int(torch.isnan(scores).sum())
    return report


# -- outputs -------------------------------------------------------------------------------------


def markdown_table(report: BestOfNReport) -> str:
    names = list(report.scorers)
    header = "| N | oracle (pass@N) | random choice | " + " | ".join(names) + " |"
    rule = "|---:|---:|---:|" + "---:|" * len(names)
    rows = [f"| {size} | {report.oracle[i]:.3f} | {report.random_choice[i]:.3f} | "
            + " | ".join(f"{report.scorers[name][i]:.3f}" for name in names) + " |"
            for i, size in enumerate(report.sizes)]
    note = (f"\n{report.prompts} prompts ({report.prompts_dropped} dropped by the engine), "
            f"{report.grading_errors} responses the verifier could not grade; unscored per scorer: {report.unscored}\n")
    return "\n".join([header, rule, *rows]) + "\n" + note


def plot_curves(report: BestOfNReport, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(report.sizes, report.oracle, "k--", marker="o", label="oracle (pass@N)")
    axes.plot(report.sizes, report.random_choice, color="grey", linestyle=":", marker="o", label="random choice")
    for name, accuracies in report.scorers.items():
        axes.plot(report.sizes, accuracies, marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_xticks(report.sizes, [str(size) for size in report.sizes])
    axes.set_xlabel("N (responses per prompt)")
    axes.set_ylabel("accuracy of the selected response")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(f"Best-of-N over {report.prompts} prompts")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(report: BestOfNReport, out_dir: str | Path) -> dict[str, Path]:
    """``best_of_n.md``, ``best_of_n.png`` and ``best_of_n.json`` in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"best_of_n.{kind}" for kind in ("md", "png", "json")}
    paths["md"].write_text(markdown_table(report))
    plot_curves(report, paths["png"])
    paths["json"].write_text(json.dumps(asdict(report), indent=2) + "\n")
    return paths
