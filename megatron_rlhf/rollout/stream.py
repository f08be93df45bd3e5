"""What a streamed rollout yields: the admitted prompts, each prompt group as it finishes, the batch.

``generate_stream(prompts, settings)`` (on :class:`~megatron_rlhf.rollout.engine.RolloutEngine`,
:class:`~megatron_rlhf.rollout.engine_pool.EnginePool` and the disaggregated engine's proxy) is
a generator of, in this order:

1. one :class:`AdmittedPrompts`: which of the caller's prompts became groups (after the engine's
   prompt admission: empty or overlong prompts are not generated for), in group order;
2. one :class:`FinishedGroup` per group, in the order the engine finishes them (not group order);
3. the :class:`~megatron_rlhf.types.RolloutBatch` the non-streamed ``generate`` returns for the
   same call (``generate`` is this generator's last item).

Row layout guarantee: every group has exactly ``samples_per_group`` responses, and response ``k``
of group ``g`` is row ``g * samples_per_group + k`` of the final batch, so a consumer can act on a
finished group's samples (score them) before the batch exists, by their final row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from megatron_rlhf.types import RolloutBatch


@dataclass(frozen=True)
class AdmittedPrompts:
    """The groups of a streamed rollout, announced before the first finishes."""

    prompt_index: tuple[int, ...]
    """The caller's index of the prompt of each group, in group order."""
    samples_per_group: int
    """Responses per group (the sampling settings' ``n``)."""


@dataclass(frozen=True)
class FinishedGroup:
    """The responses of one prompt group, as soon as all of them have finished."""

    group: int
    """Group index: rows ``group * n .. group * n + n - 1`` of the final batch."""
    prompt_index: int
    """The caller's index of the group's prompt."""
    responses: tuple[tuple[int, ...], ...]
    """Token ids of each response (without padding), in row order."""
    texts: tuple[str, ...] | None = None
    """Each response as text (``RolloutBatch.response_texts`` of these rows); None: not provided."""
    prompt: tuple[int, ...] | None = None
    """The prompt's token ids as the engine saw them (None: not provided)."""

    def rows(self, samples_per_group: int) -> range:
        """This group's rows in the final batch."""
        return range(self.group * samples_per_group, (self.group + 1) * samples_per_group)


def last_item(stream: Iterator[Any]) -> RolloutBatch:
    """Run a rollout stream to its end; its batch (what ``generate`` returns)."""
    batch = None
    for batch in stream:
        pass
    if not isinstance(batch, RolloutBatch):
        raise RuntimeError(f"a rollout stream ended with {type(batch).__name__}, not a RolloutBatch")
    return batch


def batch_from_rows(rows: list, pad_token_id: int, stats: dict[str, int]) -> RolloutBatch:
    """A right-padded batch of ``(group, prompt_index, prompt ids, response ids, sampling
    log-probs, finish reason)`` rows, in the given order."""
    import torch

    count = len(rows)
    prompt_width = max((len(r[2]) for r in rows), default=0)
    response_width = max((len(r[3]) for r in rows), default=0)
    prompt_ids = torch.full((count, prompt_width), pad_token_id, dtype=torch.long)
    response_ids = torch.full((count, response_width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((count, response_width), dtype=torch.float32)
    sampling_logprobs = torch.zeros((count, response_width), dtype=torch.float32)
    for row, (_, _, prompt, response, logprobs, _) in enumerate(rows):
        prompt_ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        if response:
            response_ids[row, : len(response)] = torch.tensor(response, dtype=torch.long)
            response_mask[row, : len(response)] = 1.0
            sampling_logprobs[row, : len(logprobs)] = torch.tensor(logprobs, dtype=torch.float32)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_lengths=torch.tensor([len(r[2]) for r in rows], dtype=torch.long),
        response_ids=response_ids,
        response_mask=response_mask,
        sampling_logprobs=sampling_logprobs,
        finish_reasons=[r[5] for r in rows],
        group_index=torch.tensor([r[0] for r in rows], dtype=torch.long),
        prompt_index=torch.tensor([r[1] for r in rows], dtype=torch.long),
        pad_token_id=pad_token_id,
        stats=stats,
    )


def groups_batch(groups: list[FinishedGroup], pad_token_id: int) -> RolloutBatch:
    """Finished groups' rows as a batch of their own, in the given order, for a pass over their
    tokens before the whole batch exists (the prompt and response token ids and masks are the
    final batch's rows; sampling log-probs are zeros and finish reasons unknown: "")."""
    rows = []
    for group in groups:
        if group.prompt is None:
            raise ValueError(f"finished group {group.group} carries no prompt token ids")
        rows += [(group.group, group.prompt_index, list(group.prompt), list(response), [], "")
                 for response in group.responses]
    return batch_from_rows(rows, pad_token_id, {})

