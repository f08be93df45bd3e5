"""Data-parallel dispatch of a rollout batch: which samples each DP rank gets, and the way back.

Pure functions over tensors (no torch.distributed, no Ray), used by the typed role proxies of
:mod:`megatron_rlhf.workers.group` and by tests that drive worker ranks directly.

* :func:`balanced_shards` assigns the samples of a batch to ``dp_size`` data-parallel ranks,
  balanced by token count (prompt + response), with the same number of samples on every rank.
  The batch is cut into ``groups`` contiguous equal groups (the PPO minibatches) and each group
  is balanced on its own, so that the union over ranks of every rank's ``k``-th local group is
  exactly the original minibatch ``k``: the update is the same optimisation as at DP=1.
  Within a group: samples by decreasing tokens (ties by index), each into the lightest rank that
  still has room (ties by rank), then single swaps between the heaviest and the lightest rank
  while they narrow the gap. Deterministic.
* :func:`select_rollout` / :meth:`~megatron_rlhf.algorithms.Experience.select` cut a rank's share;
  :func:`reassemble` puts per-rank results back into the original sample order.
* :class:`RankLayout` is what the controller needs to know about one rank: its DP rank and
  whether it holds the results (TP rank 0, CP rank 0 of the last pipeline stage).

Not guaranteed: token balance is heuristic (greedy plus swaps), not optimal; sequences are never
split across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from megatron_rlhf.types import RolloutBatch


@dataclass(frozen=True)
class RankLayout:
    """One rank's place in its group's data-parallel layout."""

    rank: int
    """Global rank in the worker group."""
    dp_rank: int
    """Data-parallel rank: ranks with the same one (TP/PP/CP peers) get the same share."""
    dp_size: int
    """Data-parallel replicas of the group."""
    holds_output: bool
    """True on the one rank per DP replica whose results are read back (TP 0, CP 0, last stage)."""


def sample_tokens(batch: RolloutBatch) -> torch.Tensor:
    """``[B]`` long: prompt + response tokens of each sample (the work it costs)."""
    return batch.prompt_lengths.to(torch.long) + batch.response_lengths


def balanced_shards(tokens: Sequence[int], dp_size: int, groups: int = 1) -> list[list[int]]:
    """Sample indices for each DP rank (``dp_size`` lists, in group order), balanced by tokens.

    ``len(tokens)`` must split into ``groups`` groups of a multiple of ``dp_size`` samples.
    """
    count = len(tokens)
    if dp_size < 1 or groups < 1:
        raise ValueError(f"dp_size={dp_size} and groups={groups} must be >= 1")
    if count % groups or (count // groups) % dp_size:
        raise ValueError(
            f"a batch of {count} samples does not split into {groups} minibatches of "
            f"{dp_size} equal data-parallel shares"
        )
    size = count // groups
    per_rank = size // dp_size
    shards: list[list[int]] = [[] for _ in range(dp_size)]
    for group in range(groups):
        members = range(group * size, (group + 1) * size)
        order = sorted(members, key=lambda index: (-int(tokens[index]), index))
        load = [0] * dp_size
        taken: list[list[int]] = [[] for _ in range(dp_size)]
        for index in order:
            open_ranks = [rank for rank in range(dp_size) if len(taken[rank]) < per_rank]
            rank = min(open_ranks, key=lambda r: (load[r], r))
            taken[rank].append(index)
            load[rank] += int(tokens[index])
        _refine(taken, load, tokens)
        for rank in range(dp_size):
            shards[rank].extend(sorted(taken[rank]))
    return shards


def _refine(taken: list[list[int]], load: list[int], tokens: Sequence[int], rounds: int = 64) -> None:
    """Swap one sample between the heaviest and the lightest rank while that narrows their gap
    (equal counts make plain longest-first leave the last, short samples on one rank)."""
    for _ in range(rounds):
        heavy = max(range(len(load)), key=lambda r: (load[r], -r))
        light = min(range(len(load)), key=lambda r: (load[r], r))
        gap = load[heavy] - load[light]
        best = None
        for i in taken[heavy]:
            for j in taken[light]:
                moved = int(tokens[i]) - int(tokens[j])
                if 0 < moved < gap and (best is None or abs(gap - 2 * moved) < best[0]):
                    best = (abs(gap - 2 * moved), i, j, moved)
        if best is None or best[0] >= gap:
            return
        _, i, j, moved = best
        taken[heavy][taken[heavy].index(i)] = j
        taken[light][taken[light].index(j)] = i
        load[heavy] -= moved
        load[light] += moved


def select_rollout(batch: RolloutBatch, index: Sequence[int]) -> RolloutBatch:
    """The samples ``index`` of ``batch`` (same padding widths, so results reassemble)."""
    rows = torch.as_tensor(list(index), dtype=torch.long)
    return replace(
        batch,
        prompt_ids=batch.prompt_ids[rows],
        prompt_lengths=batch.prompt_lengths[rows],
        response_ids=batch.response_ids[rows],
        response_mask=batch.response_mask[rows],
        sampling_logprobs=batch.sampling_logprobs[rows],
        finish_reasons=[batch.finish_reasons[i] for i in rows.tolist()],
        group_index=batch.group_index[rows],
        prompt_index=batch.prompt_index[rows],
        stats=dict(batch.stats),
        response_texts=None if batch.response_texts is None else [batch.response_texts[i] for i in rows.tolist()],
    )


def reassemble(parts: Sequence[torch.Tensor], shards: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per-DP-rank results (rows in shard order) -> one tensor in the original sample order."""
    if len(parts) != len(shards):
        raise ValueError(f"{len(parts)} results for {len(shards)} data-parallel shares")
    count = sum(len(shard) for shard in shards)
    first = parts[0]
    out = first.new_zeros((count,) + tuple(first.shape[1:]))
    for part, shard in zip(parts, shards):
        if part.shape[0] != len(shard):
            raise ValueError(f"a result of {part.shape[0]} rows for a share of {len(shard)} samples")
        out[torch.as_tensor(list(shard), dtype=torch.long)] = part
    return out


def output_ranks(layouts: Sequence[RankLayout]) -> list[RankLayout]:
    """The rank holding the results of each DP replica, by DP rank (exactly one per replica)."""
    holders = sorted((layout for layout in layouts if layout.holds_output), key=lambda layout: layout.dp_rank)
    dp_size = layouts[0].dp_size if layouts else 0
    if [layout.dp_rank for layout in holders] != list(range(dp_size)):
        raise ValueError(f"expected one output rank per DP replica (0..{dp_size - 1}), got {holders}")
    return holders
