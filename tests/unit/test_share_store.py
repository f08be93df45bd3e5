"""The batch shares a run's role proxies put into the object store (workers/share_store.py), with a
recording stand-in for ``ray.put`` (the Ray path: tests/integration/test_role_proxies_ray.py)."""

from __future__ import annotations

import threading

import torch

from megatron_rlhf.types import RolloutBatch
import pytest

from megatron_rlhf.workers.share_store import ShareStore


def _batch(marker: int, rows: int = 4) -> RolloutBatch:
    return RolloutBatch(
        prompt_ids=torch.full((rows, 1), marker), prompt_lengths=torch.ones(rows, dtype=torch.long),
        response_ids=torch.full((rows, 1), marker), response_mask=torch.ones(rows, 1),
        sampling_logprobs=torch.zeros(rows, 1), finish_reasons=["stop"] * rows,
        group_index=torch.arange(rows), prompt_index=torch.arange(rows), pad_token_id=0, stats={},
        response_texts=["x"] * rows)


def test_each_share_is_put_once_per_batch_and_split_and_recent_batches_are_kept():
    puts = []
    store = ShareStore(recent=2, put=lambda share: puts.append(share) or len(puts))
    first, second, third = _batch(1), _batch(2), _batch(3)
    refs = store.rollout_shares(first, [[0, 1], [2, 3]])
    assert store.rollout_shares(first, [[0, 1], [2, 3]]) == refs and store.puts == 2
    assert all(share.response_texts is None for share in puts)  # ranks never read the text
    store.rollout_shares(second, [[0, 1], [2, 3]])  # the next step's batch, dispatched early
    assert store.rollout_shares(first, [[0, 1], [2, 3]]) == refs and store.puts == 4  # still kept
    store.rollout_shares(third, [[0, 1, 2, 3]])
    assert store.rollout_shares(first, [[0, 1], [2, 3]]) != refs and store.puts == 7  # dropped, put again


def test_a_synchronous_run_keeps_only_the_last_batch():
    puts = []
    store = ShareStore(put=lambda share: puts.append(share) or len(puts))
    first, second = _batch(1), _batch(2)
    refs = store.rollout_shares(first, [[0, 1], [2, 3]])
    store.rollout_shares(second, [[0, 1], [2, 3]])
    assert store.rollout_shares(first, [[0, 1], [2, 3]]) != refs and store.puts == 6  # dropped, put again
    with pytest.raises(ValueError, match="recent=0"):
        ShareStore(recent=0)


def test_batches_dispatched_from_two_threads_get_their_own_shares():
    store = ShareStore(recent=2, put=lambda share: share)
    batches = [_batch(marker) for marker in range(1, 9)]
    seen: dict[int, list] = {}

    def dispatch(offset: int) -> None:
        for batch in batches[offset::2]:
            for _ in range(20):
                shares = store.rollout_shares(batch, [[0, 1], [2, 3]])
                seen.setdefault(int(batch.prompt_ids[0, 0]), []).append(
                    [int(share.prompt_ids[0, 0]) for share in shares])

    threads = [threading.Thread(target=dispatch, args=(offset,)) for offset in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(markers == [marker, marker] for marker, lists in seen.items() for markers in lists)
