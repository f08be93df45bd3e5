"""Held-out evaluation of a policy per domain: sample with vLLM, grade with the reward sources.

:func:`evaluate_policy` starts a :class:`~megatron_rlhf.rollout.engine.RolloutEngine` on a policy
directory, answers every held-out prompt ``samples_per_prompt`` times at the sampling
temperature (and once greedily), scores the answers with a reward source (the router: verifiers
for math and code, the reward model for general chat) and reports per domain:

- ``sampled_accuracy``: mean over prompts and samples of "a verifier passed it" (an unbiased
  estimate of pass@1 at that temperature);
- ``greedy_accuracy``: the same for the greedy answer;
- ``mean_reward``: mean reward of the sampled answers (for learned-reward domains, where
  accuracy is not defined, this is the number to compare).

Infrastructure errors (a crashed sandbox) are counted, never scored as wrong. Prompts the engine
drops (over-long, empty) are counted and left out. The engine is always shut down.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class HeldOutEvalConfig:
    samples_per_prompt: int = 4
    """Sampled answers per prompt (>= 1)."""
    temperature: float = 1.0
    max_new_tokens: int = 64
    max_model_len: int = 256
    greedy: bool = True
    """Also grade one greedy answer per prompt."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1 or self.max_new_tokens < 1:
            raise ValueError("samples_per_prompt and max_new_tokens must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")


@dataclass
class DomainScores:
    sampled_accuracy: float
    greedy_accuracy: float | None
    mean_reward: float | None
    prompts: int
    infra_errors: int


@dataclass
class HeldOutResult:
    domains: dict[str, DomainScores] = field(default_factory=dict)
    prompts_dropped: int = 0

    def accuracy(self, kind: str = "sampled") -> dict[str, float]:
        """Domain -> accuracy (``sampled`` or ``greedy``)."""
        key = f"{kind}_accuracy"
        return {d: getattr(s, key) for d, s in self.domains.items() if getattr(s, key) is not None}


def evaluate_policy(policy_dir: str, prompts: Sequence[Any], scorer: Any, config: HeldOutEvalConfig = HeldOutEvalConfig(),
                    chat_template: bool = True) -> HeldOutResult:
    """Grade ``policy_dir``'s answers to ``prompts`` (PromptRecords) with ``scorer`` (a RewardSource)."""
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine
    from megatron_rlhf.config.sampling import SamplingSettings

    inputs = [p.engine_input(chat_template) for p in prompts]
    rollout = RolloutConfig(model_dir=policy_dir, max_model_len=config.max_model_len, overlong_prompts="drop",
                            seed=config.seed, weight_transfer_backend=None)
    with RolloutEngine(rollout) as engine:
        sampled = engine.generate(inputs, SamplingSettings(n=config.samples_per_prompt, temperature=config.temperature,
                                                           max_new_tokens=config.max_new_tokens, seed=config.seed))
        greedy = None
        if config.greedy:
            greedy = engine.generate(inputs, SamplingSettings(n=1, temperature=0.0,
                                                              max_new_tokens=config.max_new_tokens, seed=config.seed))
        tokenizer = engine.tokenizer
    sampled_results = _grade(sampled, prompts, scorer, tokenizer)
    greedy_results = _grade(greedy, prompts, scorer, tokenizer) if greedy is not None else None
    result = HeldOutResult(prompts_dropped=len(prompts) - len(set(sampled.prompt_index.tolist())))
    for domain, rows in sorted(sampled_results.items()):
        greedy_rows = greedy_results.get(domain, []) if greedy_results is not None else None
        result.domains[domain] = DomainScores(
            sampled_accuracy=_accuracy(rows),
            greedy_accuracy=_accuracy(greedy_rows) if greedy_rows else None,
            mean_reward=_mean_reward(rows),
            prompts=len({prompt_id for prompt_id, _ in rows}),
            infra_errors=sum(result.reward is None for _, result in rows),
        )
    return result


def _grade(batch: Any, prompts: Sequence[Any], scorer: Any, tokenizer: Any) -> dict[str, list]:
    from megatron_rlhf.rewards.sample import RewardSample

    samples = []
    for row, (index, response) in enumerate(zip(batch.prompt_index.tolist(), batch.texts(tokenizer))):
        prompt = prompts[index]
        samples.append(RewardSample(sample_id=f"eval:{row}:{prompt.id}", domain=prompt.domain, prompt=prompt.text,
                                    response=response, ground_truth=prompt.ground_truth))
    by_domain: dict[str, list] = defaultdict(list)
    for sample, result, index in zip(samples, scorer.score(samples), batch.prompt_index.tolist()):
        by_domain[sample.domain].append((index, result))
    return by_domain


def _accuracy(rows: Sequence[tuple[int, Any]]) -> float:
    graded = [result for _, result in rows if result.reward is not None]
    passed = [result.status.value == "scored" and result.verdict.value == "ok" and result.reward > 0 for result in graded]
    return sum(passed) / len(passed) if passed else 0.0


def _mean_reward(rows: Sequence[tuple[int, Any]]) -> float | None:
    rewards = [result.reward for _, result in rows if result.reward is not None]
    return sum(rewards) / len(rewards) if rewards else None
