"""The per-step metrics of the RL loop, from what the step already computed (no extra passes).

Names (``/``-separated groups, as they appear in JSONL, TensorBoard and W&B):

- ``reward/mean``, ``reward/<domain>``: rewards of valid samples as training uses them (after the
  router's per-domain normalisation and clipping); ``score/<domain>``: the raw score (the router's
  weighted sum of its sources' rewards before normalisation, e.g. a reward model's output);
  ``accuracy/<domain>``:
  fraction of samples a verifier passed (domains whose rewards are all 0 or 1, i.e. pass/fail
  verifiers; learned scores have no accuracy); ``reward/infra_errors``; ``source/<name>/mean`` and
  ``source/<name>/count``: each reward source's raw reward over the valid samples it scored (its
  contribution to the hybrid reward; from the router's ``source_rewards``);
- ``kl/mean`` (per token, rollout policy vs reference), ``kl/coef``; ``entropy/mean`` (per token);
- ``response/length_mean``, ``response/hit_max_tokens``, ``diversity/edit`` (mean pairwise
  normalised edit distance among the n responses of a prompt; absent for n = 1);
- ``actor/*`` and ``critic/*``: loss, clip fraction, grad norm, ... averaged over the step's
  optimizer steps, ``actor/skipped_steps`` summed; ``actor/old_logprob_pass`` (set by the step) is
  0 when an on-policy update skipped the old-policy pass: the old log-probs, the KL, the entropy
  and the ratios below then come from the update's own forward;
- ``ratio/engine_mean``, ``ratio/engine_max_abs_logprob_diff``: importance ratio of the trainer's
  log-probs against the engine's sampling log-probs (1 and 0 when both hold the same weights);
- ``weight_sync/seconds`` (one-step-off: until the weights are packed, the engines' load then
  overlapping the next step; ``time/engine_load_wait``, set by the step, is what the generation
  of the next batch still waited for it); ``time/<phase>`` and ``time/step``; ``throughput/tokens_per_second``;
  ``time/to_first_step`` (first step of a process only: seconds from the command's start to the
  end of that step, added by the RL loop) and ``startup/<phase>`` beside it
  (:mod:`megatron_rlhf.trainer.startup_timeline`);
- ``actor/padding_fraction``, ``critic/padding_fraction``: 1 - real / computed positions of the
  update's forward (packed or padded).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch


def step_metrics(*, batch, prompts: Sequence[Any], results: Sequence[Any], experience, old_logprobs: torch.Tensor,
                 entropy: torch.Tensor, actor_stats: Sequence[Any], critic_stats: Sequence[Any], kl_coef: float,
                 mean_kl: float, weight_sync: dict[str, float], timings: dict[str, float]) -> dict[str, float]:
    from megatron_rlhf.evaluation.diversity import edit_diversity, responses_by_group

    metrics: dict[str, float] = {}
    metrics.update(_reward_metrics(prompts, results))
    mask = experience.response_mask.to(torch.float32)
    tokens = float(mask.sum())
    metrics["kl/mean"] = mean_kl
    metrics["kl/coef"] = kl_coef
    metrics["entropy/mean"] = float((entropy * mask).sum() / max(tokens, 1.0))
    lengths = batch.response_lengths.to(torch.float32)
    metrics["response/length_mean"] = float(lengths.mean()) if lengths.numel() else 0.0
    metrics["response/hit_max_tokens"] = sum(reason == "length" for reason in batch.finish_reasons) / max(batch.num_samples, 1)
    diversity = edit_diversity(responses_by_group(batch.response_ids, batch.response_mask, batch.group_index))
    if diversity is not None:
        metrics["diversity/edit"] = diversity
    metrics.update(_optimizer_metrics("actor", actor_stats))
    metrics.update(_optimizer_metrics("critic", critic_stats))
    difference = (old_logprobs - batch.sampling_logprobs) * mask
    metrics["ratio/engine_mean"] = float((torch.exp(difference) * mask).sum() / max(tokens, 1.0))
    metrics["ratio/engine_max_abs_logprob_diff"] = float(difference.abs().max()) if difference.numel() else 0.0
    metrics["weight_sync/seconds"] = float(weight_sync["seconds"])
    metrics.update(timings)
    step_seconds = timings.get("time/step", 0.0)
    generated = float(batch.response_lengths.sum())
    metrics["throughput/tokens_per_second"] = generated / step_seconds if step_seconds > 0 else 0.0
    metrics["prompts/dropped"] = float(batch.stats.get("prompts_dropped_too_long", 0) + batch.stats.get("prompts_dropped_empty", 0))
    return metrics


def _reward_metrics(prompts: Sequence[Any], results: Sequence[Any]) -> dict[str, float]:
    by_domain: dict[str, list[float]] = defaultdict(list)
    scores: dict[str, list[float]] = defaultdict(list)
    passed: dict[str, list[float]] = defaultdict(list)
    errors = 0
    for prompt, result in zip(prompts, results):
        if result.reward is None:
            errors += 1
            continue
        score = float(result.reward if result.raw_score is None else result.raw_score)
        by_domain[prompt.domain].append(float(result.reward))
        scores[prompt.domain].append(score)
        passed[prompt.domain].append(float(result.status.value == "scored" and score > 0))
    by_source: dict[str, list[float]] = defaultdict(list)
    for result in results:
        if result.reward is not None:
            for name, value in result.source_rewards or ():
                by_source[name].append(value)
    every = [value for values in by_domain.values() for value in values]
    metrics = {"reward/mean": sum(every) / len(every) if every else 0.0, "reward/infra_errors": float(errors)}
    for domain, values in sorted(by_domain.items()):
        metrics[f"reward/{domain}"] = sum(values) / len(values)
        metrics[f"score/{domain}"] = sum(scores[domain]) / len(scores[domain])
        if all(value in (0.0, 1.0) for value in scores[domain]):  # a verifier's pass/fail, not a learned score
            metrics[f"accuracy/{domain}"] = sum(passed[domain]) / len(passed[domain])
    for name, values in sorted(by_source.items()):
        metrics[f"source/{name}/mean"] = sum(values) / len(values)
        metrics[f"source/{name}/count"] = float(len(values))
    return metrics


def _optimizer_metrics(prefix: str, stats: Sequence[Any]) -> dict[str, float]:
    if not stats:
        return {}
    applied = [s for s in stats if not s.skipped]
    metrics = {f"{prefix}/skipped_steps": float(sum(s.skipped for s in stats)),
               f"{prefix}/learning_rate": float(stats[-1].learning_rate)}
    if applied:
        metrics[f"{prefix}/loss"] = sum(s.loss for s in applied) / len(applied)
        metrics[f"{prefix}/grad_norm"] = sum(float(s.grad_norm) for s in applied) / len(applied)
        for name in applied[0].terms:
            metrics[f"{prefix}/{name}"] = sum(s.terms[name] for s in applied) / len(applied)
    return metrics
