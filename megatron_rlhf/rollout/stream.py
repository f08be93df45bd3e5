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
