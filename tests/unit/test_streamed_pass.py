"""StreamedPass (trainer/rollout_phase.py): a worker group's per-sample pass on blocks of finished
prompt groups during generation. Real stream events and batches (rollout/stream.py); the group's
pass is a per-row function standing in for the reference (real groups: the synchronous RL tests,
tests/integration/test_rl_loop.py and the e2e resume test, which needs the same numbers every run)."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_rlhf.rollout.stream import FinishedGroup, batch_from_rows, groups_batch
from megatron_rlhf.trainer.rollout_phase import StreamedPass

PAD = 0


class Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def row_pass(batch):
    """A per-row result that depends on the row's prompt and response tokens only."""
    prompt_sum = (batch.prompt_ids * (torch.arange(batch.prompt_ids.shape[1]) < batch.prompt_lengths[:, None])).sum(1)
    return batch.response_ids.to(torch.float32) * 0.5 + prompt_sum[:, None] * batch.response_mask


def make_groups(count, per_group, seed=0):
    rng = random.Random(seed)
    groups = []
    for g in range(count):
        prompt = tuple(rng.randrange(1, 50) for _ in range(rng.randrange(1, 6)))
        responses = tuple(tuple(rng.randrange(1, 50) for _ in range(rng.randrange(0, 7))) for _ in range(per_group))
        groups.append(FinishedGroup(g, g, responses, None, prompt))
    return groups


def final_batch(groups, per_group):
    rows = [(g.group, g.prompt_index, list(g.prompt), list(r), [0.0] * len(r), "stop") for g in groups for r in g.responses]
    return batch_from_rows(rows, PAD, {})


def run(groups, per_group, order, **options):
    issued = []

    def start(batch):
        issued.append(batch)
        return Done(row_pass(batch))

    streamed = StreamedPass(start, PAD, **options)
    streamed.admitted(len(groups), per_group)
    counts = []
    for index in order:
        streamed.add(groups[index])
        counts.append(len(issued))
    streamed.finish()
    return streamed.bound(final_batch(groups, per_group)).result(), issued, counts


def test_blocks_go_as_soon_as_complete_and_results_land_in_batch_rows():
    groups = make_groups(16, 4)
    order = list(reversed(range(16)))
    result, issued, counts = run(groups, 4, order, blocks=8)
    assert len(issued) == 8 and all(batch.num_samples == 8 for batch in issued)
    assert counts[1] == 1  # groups 15 and 14 finished: their block went at once, before the stream ended
    batch = final_batch(groups, 4)
    assert torch.equal(result, row_pass(batch) * batch.response_mask)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_blocks_never_depend_on_the_finishing_order(seed):
    groups = make_groups(10, 2, seed=seed)
    first = run(groups, 2, list(range(10)), blocks=4)
    order = list(range(10))
    random.Random(seed).shuffle(order)
    second = run(groups, 2, order, blocks=4)
    assert torch.equal(first[0], second[0])
    as_sets = lambda issued: sorted(tuple(b.group_index.tolist()) for b in issued)  # noqa: E731
    assert as_sets(first[1]) == as_sets(second[1])
    assert all(b.group_index.tolist() == sorted(b.group_index.tolist()) for b in second[1])


def test_every_block_has_a_share_for_each_data_parallel_replica():
    groups = make_groups(5, 1)
    _, issued, _ = run(groups, 1, list(range(5)), blocks=8, min_rows=2)
    assert [b.num_samples for b in issued] == [3, 2]
    _, issued, _ = run(make_groups(3, 1), 1, [0, 1, 2], blocks=8, min_rows=4)
    assert [b.num_samples for b in issued] == [3]  # fewer rows than replicas: one block (as unstreamed)


def test_a_group_without_prompt_ids_is_refused():
    with pytest.raises(ValueError, match="no prompt token ids"):
        groups_batch([FinishedGroup(0, 0, ((1,),), None)], PAD)
