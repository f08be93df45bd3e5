"""The rollout side of an RL step: generation with rewards streamed alongside it, and the
rollout/trainer mismatch metrics.

:func:`generate_scored` consumes an engine's :mod:`~megatron_rlhf.rollout.stream` events and hands
each finished prompt group's samples to a :class:`~megatron_rlhf.rewards.streaming.RewardStream`
at once, so the sandbox and the learned scorers work while the engine is still generating; the
step then only waits for the last groups' scores (``stream.results``).

Guarantee: the reward samples are exactly those :func:`~megatron_rlhf.trainer.rl_step.reward_samples`
builds from the finished batch (same ids, text, domain, ground truth, row), so the rewards equal
the non-streamed ``router.score`` of the batch (see :mod:`megatron_rlhf.rewards.streaming` for
the one caveat, batch-shape effects inside a learned scorer). The response text is the engine's
(``FinishedGroup.texts``, equal to the decode) when it sent it; the controller decodes otherwise.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from megatron_rlhf.types import RolloutBatch


def group_samples(group: Any, samples_per_group: int, prompts: Sequence[Any], tokenizer: Any,
                  step: int) -> list[tuple[int, Any]]:
    """``(row, RewardSample)`` of a finished group, as :func:`rl_step.reward_samples` builds them."""
    from megatron_rlhf.rewards.sample import RewardSample

    prompt = prompts[group.prompt_index]
    texts = group.texts if group.texts is not None else [
        tokenizer.decode(list(ids), skip_special_tokens=True) for ids in group.responses]
    pairs = []
    for row, text in zip(group.rows(samples_per_group), texts):
        pairs.append((row, RewardSample(
            sample_id=f"{step}:{row}:{prompt.id}",
            domain=prompt.domain,
            prompt=prompt.text,
            response=text,
            ground_truth=prompt.ground_truth,
        )))
    return pairs


def generate_scored(engine: Any, inputs: list, sampling: Any, prompts: Sequence[Any], tokenizer: Any,
                    router: Any, step: int) -> tuple[RolloutBatch, Any]:
    """Generate with ``engine.generate_stream`` while scoring each finished group; returns the
    batch and its :class:`RewardStream` (call ``results(batch.num_samples)`` for the rewards)."""
    from megatron_rlhf.rewards.streaming import RewardStream
    from megatron_rlhf.rollout.stream import AdmittedPrompts, FinishedGroup

    stream = RewardStream(router)
    batch, per_group = None, sampling.n
    try:
        for event in engine.generate_stream(inputs, sampling):
            if isinstance(event, AdmittedPrompts):
                per_group = event.samples_per_group
            elif isinstance(event, FinishedGroup):
                stream.add(group_samples(event, per_group, prompts, tokenizer, step))
            else:
                batch = event
    except BaseException:
        stream.close()
        raise
    if not isinstance(batch, RolloutBatch):
        stream.close()
        raise RuntimeError("the engine's rollout stream ended without a batch")
    return batch, stream


def rollout_correction_metrics(old_logprobs: torch.Tensor, batch: RolloutBatch, response_mask: torch.Tensor,
                               algorithm: Any) -> dict[str, float]:
    """``rollout_is/*``: the trainer-vs-engine mismatch KL and the truncated IS weights' statistics
    (:mod:`megatron_rlhf.algorithms.rollout_correction`; weights of level "none" are all 1)."""
    from megatron_rlhf.algorithms import rollout_correction_stats

    stats = rollout_correction_stats(old_logprobs, batch.sampling_logprobs, response_mask,
                                     algorithm.rollout_is, algorithm.rollout_is_threshold)
    return {
        "rollout_is/mismatch_kl": float(stats.mismatch_kl),
        "rollout_is/log_ratio_abs_max": float(stats.log_ratio_abs_max),
        "rollout_is/weight_mean": float(stats.weight_mean),
        "rollout_is/weight_min": float(stats.weight_min),
        "rollout_is/weight_max": float(stats.weight_max),
        "rollout_is/truncated_fraction": float(stats.truncated_fraction),
    }
