"""Reference responses for the GenRM of general tasks, chosen by a Bradley-Terry reward model's
Best-of-N (ByteDance Seed, "Exploring Data Scaling Trends and Effects in RLHF").

Reasoning tasks have a ground-truth answer the GenRM judges a response against. General tasks
have none; the Seed paper gives the judge one anyway: the policy samples N responses to the prompt
and the BT reward model's favourite becomes the reference. :func:`attach_bon_references` does that
for every prompt of the chosen domains and returns prompt rows (the
:mod:`megatron_rlhf.data.prompts` schema) whose ``ground_truth`` is the picked response, so a
``genrm`` source with ``reference: optional`` or ``required`` judges against it in `train-rl`.

Selection (:func:`pick_references`) is pure: the highest score wins, the first of tied best
scores wins, a NaN score (the RM could not score) never wins, and a prompt whose scores are all
NaN (or that got no response) gets no reference (its row keeps no ``ground_truth``, and a
``required`` GenRM reports it as an error instead of judging against nothing). Prompts of other
domains are returned unchanged. Not guaranteed: that the picked response is good; it is only the
reward model's best of N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from megatron_rlhf.rewards.sample import RewardSample


@dataclass(frozen=True)
class BoNReferenceConfig:
    n: int = 8
    """Responses sampled per prompt; the reward model picks one. >= 1."""
    domains: tuple[str, ...] = ("general",)
    """Domains whose prompts get a reference (the others keep their ground truth)."""
    temperature: float = 1.0
    max_new_tokens: int = 256
    chat_template: bool = True
    seed: int | None = 0

    def __post_init__(self) -> None:
        for name in ("n", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BoN reference {name} must be a positive integer, got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"BoN reference temperature={self.temperature!r} must be > 0")


def pick_references(responses: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> list[str | None]:
    """Per prompt, the best-scored response (see the module docstring)."""
    if len(responses) != len(scores):
        raise ValueError(f"{len(responses)} prompts of responses but {len(scores)} of scores")
    picked: list[str | None] = []
    for index, (texts, values) in enumerate(zip(responses, scores)):
        if len(texts) != len(values):
            raise ValueError(f"prompt {index}: {len(texts)} responses but {len(values)} scores")
        best, best_score = None, -math.inf
        for text, value in zip(texts, values):
            if not math.isnan(value) and value > best_score:
                best, best_score = text, value
        picked.append(best)
    return picked


def attach_bon_references(records: Sequence[Any], engine: Any, reward_model: Any,
                          config: BoNReferenceConfig = BoNReferenceConfig()) -> list[dict[str, Any]]:
    """Prompt rows of ``records`` (PromptRecords) with the BoN reference as ``ground_truth`` for the
    prompts of ``config.domains``; ``reward_model`` is a RewardSource (e.g. a trained BT RM)."""
    from megatron_rlhf.config.sampling import SamplingSettings

    chosen = [record for record in records if record.domain in config.domains]
    responses: list[list[str]] = [[] for _ in chosen]
    if chosen:
        settings = SamplingSettings(n=config.n, temperature=config.temperature,
                                    max_new_tokens=config.max_new_tokens, seed=config.seed)
        batch = engine.generate([record.engine_input(config.chat_template) for record in chosen], settings)
        responses = batch.texts_by_prompt(engine.tokenizer, len(chosen))
    samples = [RewardSample(f"{record.id}/{k}", record.domain, record.text, text)
               for record, texts in zip(chosen, responses) for k, text in enumerate(texts)]
    results = reward_model.score(samples) if samples else []
    flat = iter([math.nan if result.reward is None else float(result.reward) for result in results])
    references = iter(pick_references(responses, [[next(flat) for _ in texts] for texts in responses]))
    rows = []
    for record in records:
        row = record.to_row()
        if record.domain in config.domains:
            reference = next(references)
            row.pop("ground_truth", None)
            if reference is not None:
                row["ground_truth"] = reference
        rows.append(row)
    return rows
