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

:class:`StreamedPass` does the same for a worker group's per-sample pass (the frozen reference's
log-probs in synchronous steps): chunks of finished groups go to the group while the engine
generates, so the pass mostly overlaps generation instead of following it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

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


class StreamedPass:
    """A per-sample pass of another worker group (the reference's log-probs, the critic's
    values: ``start(batch) -> PendingResult``) run on finished prompt groups while the engine
    still generates the rest.

    The groups are split into up to ``blocks`` fixed blocks (consecutive group indices, at least
    ``min_rows`` rows each: the group's data-parallel replicas each get a share); a block's pass
    is issued as soon as its last group has finished, and :meth:`result` puts its rows where the
    final batch has them. A block's rows, and so the pass's result, depend only on the groups'
    tokens, never on the order or timing in which they finished: a run gives the same numbers
    every time (a resumed run included). They equal the pass over the whole batch up to
    batch-shape rounding (only the rows beside a row in a micro-batch differ).
    """

    def __init__(self, start: Callable[[RolloutBatch], Any], pad_token_id: int, min_rows: int = 1,
                 blocks: int = 8):
        self.start = start
        self.pad_token_id = pad_token_id
        self.min_rows = max(1, min_rows)
        self.blocks = max(1, blocks)
        self.chunks: list[tuple[list[int], Any]] = []
        """``(rows in the final batch, pending result)`` per issued block."""
        self.per_group = 1
        self._block_of: list[int] = []
        self._waiting: dict[int, list[Any]] = {}
        self._sizes: list[int] = []

    def admitted(self, groups: int, per_group: int) -> None:
        """The stream's groups are known: fix the blocks."""
        self.per_group = per_group
        count = max(1, min(self.blocks, groups))
        while count > 1 and (groups // count) * per_group < self.min_rows:
            count -= 1
        self._sizes = [groups // count + (1 if b < groups % count else 0) for b in range(count)]
        self._block_of = [b for b, size in enumerate(self._sizes) for _ in range(size)]
        self._waiting = {b: [] for b in range(count)}

    def add(self, group: Any) -> None:
        """A finished group (:class:`~megatron_rlhf.rollout.stream.FinishedGroup`)."""
        block = self._block_of[group.group]
        self._waiting[block].append(group)
        if len(self._waiting[block]) == self._sizes[block]:
            self._issue(block)

    def finish(self) -> None:
        """The stream ended: every block must have been issued."""
        for block, groups in list(self._waiting.items()):
            if groups:
                self._issue(block)

    def _issue(self, block: int) -> None:
        from megatron_rlhf.rollout.stream import groups_batch

        groups = sorted(self._waiting.pop(block), key=lambda group: group.group)
        rows = [row for group in groups for row in group.rows(self.per_group)]
        self.chunks.append((rows, self.start(groups_batch(groups, self.pad_token_id))))

    def result(self, batch: RolloutBatch) -> torch.Tensor:
        """``[B, R]`` float32 results in ``batch``'s row order (0.0 past each chunk's width)."""
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
        covered = torch.zeros(batch.num_samples, dtype=torch.bool)
        for rows, pending in self.chunks:
            values = pending.result()
            index = torch.as_tensor(rows, dtype=torch.long)
            out[index, : values.shape[1]] = values.to(torch.float32)
            covered[index] = True
        if not bool(covered.all()):
            missing = (~covered).nonzero().flatten().tolist()
            raise RuntimeError(f"a streamed pass covers no result for rows {missing[:8]} of the batch")
        return out

    def bound(self, batch: RolloutBatch) -> Any:
        """A pending result for ``batch`` (``result()``), as the group's ``start_*`` returns."""
        return _BoundPass(self, batch)


class _BoundPass:
    def __init__(self, streamed: StreamedPass, batch: RolloutBatch):
        self.streamed, self.batch = streamed, batch

    def result(self) -> torch.Tensor:
        return self.streamed.result(self.batch)


def generate_scored(engine: Any, inputs: list, sampling: Any, prompts: Sequence[Any], tokenizer: Any,
                    router: Any, step: int, passes: Sequence[StreamedPass] = ()) -> tuple[RolloutBatch, Any]:
    """Generate with ``engine.generate_stream`` while scoring each finished group (and running
    ``passes`` on them); returns the batch and its :class:`RewardStream` (call
    ``results(batch.num_samples)`` for the rewards)."""
    from megatron_rlhf.rewards.streaming import RewardStream
    from megatron_rlhf.rollout.stream import AdmittedPrompts, FinishedGroup

    stream = RewardStream(router)
    batch, per_group = None, sampling.n
    try:
        for event in engine.generate_stream(inputs, sampling):
            if isinstance(event, AdmittedPrompts):
                per_group = event.samples_per_group
                for streamed in passes:
                    streamed.admitted(len(event.prompt_index), per_group)
            elif isinstance(event, FinishedGroup):
                stream.add(group_samples(event, per_group, prompts, tokenizer, step))
                for streamed in passes:
                    streamed.add(event)
            else:
                batch = event
                for streamed in passes:
                    streamed.finish()
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
