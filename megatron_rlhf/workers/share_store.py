"""The data-parallel shares of one rollout batch, put into Ray's object store once per step.

An RL step hands the same batch to the actor's log-prob pass, the reference, the critic and the
updates. Each call splits it into DP shares (deterministic for a batch and a split); without
this store every call would pickle its shares into the object store again. A
:class:`ShareStore` shared by the run's role proxies keeps the object refs of the last batch's
shares by split, so each share is serialised once and every rank of every role that gets the
same split reads the same object.

Guarantees: a share is the batch's rows ``shard`` (``select_rollout``), without the response
text (ranks never read it); a new batch object (``dataclasses.replace`` makes one) drops the
previous batch's refs. Not guaranteed: a batch mutated in place after its first dispatch is not
noticed (batches are treated as immutable values).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from megatron_rlhf.parallel.data_dispatch import select_rollout
from megatron_rlhf.types import RolloutBatch


class ShareStore:
    """Object refs of the last dispatched batch's shares, one list per split."""

    def __init__(self) -> None:
        self._batch: RolloutBatch | None = None
        self._by_split: dict[tuple[tuple[int, ...], ...], list[Any]] = {}
        self.puts = 0
        """Shares put into the object store so far (each share is put once per batch and split)."""

    def rollout_shares(self, batch: RolloutBatch, shards: Sequence[Sequence[int]]) -> list[Any]:
        """One object ref per shard: the batch's rows of that shard (put on first use)."""
        import ray

        if batch is not self._batch:  # a strong reference: the identity is never reused meanwhile
            self._batch, self._by_split = batch, {}
        split = tuple(tuple(int(i) for i in shard) for shard in shards)
        if split not in self._by_split:
            textless = replace(batch, response_texts=None)
            self._by_split[split] = [ray.put(select_rollout(textless, shard)) for shard in split]
            self.puts += len(split)
        return self._by_split[split]
