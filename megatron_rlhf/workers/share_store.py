"""The data-parallel shares of one rollout batch, put into Ray's object store once per step.

An RL step hands the same batch to the actor's log-prob pass, the reference, the critic and the
updates. Each call splits it into DP shares (deterministic for a batch and a split); without
this store every call would pickle its shares into the object store again. A
:class:`ShareStore` shared by the run's role proxies keeps the object refs of the last batch's
shares by split, so each share is serialised once and every rank of every role that gets the
same split reads the same object.

Guarantees: a share is the batch's rows ``shard`` (``select_rollout``), without the response
text (ranks never read it); the refs of the ``recent`` batches dispatched last are kept (a
batch is a new object after ``dataclasses.replace``), older ones dropped: 1 in synchronous runs,
2 in one-step-off runs, which dispatch the next step's batch to the reference (from the
generating thread) while this step's batch is still in use; calls from several threads are
serialised (a lock), so a batch's refs are always its own. Not guaranteed: a batch mutated in place after its first dispatch is not
noticed (batches are treated as immutable values).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Sequence

from megatron_rlhf.parallel.data_dispatch import select_rollout
from megatron_rlhf.types import RolloutBatch


class ShareStore:
    """Object refs of the recently dispatched batches' shares, one list per split."""

    def __init__(self, recent: int = 1, put: Any = None) -> None:
        if recent < 1:
            raise ValueError(f"ShareStore(recent={recent}): keep the shares of at least one batch")
        self.recent = recent
        """Batches whose shares are kept (see the module docstring)."""
        self._put = put
        """Puts one object into the store and returns its ref (None: ``ray.put``)."""
        self._recent: list[tuple[RolloutBatch, dict[tuple[tuple[int, ...], ...], list[Any]]]] = []
        self._lock = threading.Lock()
        self.puts = 0
        """Shares put into the object store so far (each share is put once per batch and split)."""

    def rollout_shares(self, batch: RolloutBatch, shards: Sequence[Sequence[int]]) -> list[Any]:
        """One object ref per shard: the batch's rows of that shard (put on first use)."""
        if self._put is None:
            import ray

            self._put = ray.put
        split = tuple(tuple(int(i) for i in shard) for shard in shards)
        with self._lock:
            # strong references to the batches: their identities are never reused meanwhile
            by_split = next((refs for known, refs in self._recent if known is batch), None)
            if by_split is None:
                by_split = {}
                self._recent = [*self._recent, (batch, by_split)][-self.recent:]
            if split not in by_split:
                textless = replace(batch, response_texts=None)
                by_split[split] = [self._put(select_rollout(textless, shard)) for shard in split]
                self.puts += len(split)
            return by_split[split]
