"""Rollout data parallelism: prompts split over engines and merged back as one engine's batch."""

from __future__ import annotations

import torch

from megatron_rlhf.config.sampling import SamplingSettings
from megatron_rlhf.rollout.engine_pool import EnginePool, merge_rollout_batches, split_prompts
from megatron_rlhf.types import RolloutBatch


def test_split_prompts_is_contiguous_and_balanced():
    assert [list(r) for r in split_prompts(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(r) for r in split_prompts(7, 3)] == [3, 2, 2]
    assert [len(r) for r in split_prompts(1, 3)] == [1, 0, 0]


def _batch(prompts: list[list[int]], responses_per_prompt: int, tag: int) -> RolloutBatch:
    """What one engine returns: every prompt answered ``responses_per_prompt`` times."""
    rows = [(g, p, r) for g, p in enumerate(prompts) for r in range(responses_per_prompt)]
    pw = max(len(p) for p in prompts)
    prompt_ids = torch.zeros(len(rows), pw, dtype=torch.long)
    for i, (_, p, _) in enumerate(rows):
        prompt_ids[i, : len(p)] = torch.tensor(p)
    width = 2 + tag  # engines return different response widths
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_lengths=torch.tensor([len(p) for _, p, _ in rows]),
        response_ids=torch.full((len(rows), width), 7 + tag), response_mask=torch.ones(len(rows), width),
        sampling_logprobs=torch.full((len(rows), width), -0.5), finish_reasons=["length"] * len(rows),
        group_index=torch.tensor([g for g, _, _ in rows]), prompt_index=torch.tensor([g for g, _, _ in rows]),
        pad_token_id=0, stats={"prompts_in": len(prompts), "responses": len(rows)},
    )


class _Engine:
    """A stand-in for a remote engine that records what it was asked (the pool's own logic is
    what is tested here; real engines are exercised by the vLLM tests)."""

    def __init__(self, tag: int):
        self.tag, self.seen = tag, []

    def generate(self, prompts, settings):
        self.seen.append(list(prompts))
        self.settings = settings
        return _batch(prompts, settings.n, self.tag)


def test_pool_sends_each_prompt_to_one_engine_and_merges_in_order():
    engines = [_Engine(0), _Engine(1)]
    prompts = [[1], [2, 2], [3, 3, 3]]
    batch = EnginePool(engines).generate(prompts, SamplingSettings(n=2, seed=100))
    assert engines[0].seen == [[[1], [2, 2]]] and engines[1].seen == [[[3, 3, 3]]]
    # an engine seeds prompt i of its call seed + i*n: the second engine's first prompt is the
    # call's third, so its seed moves on by 2 prompts x 2 samples (the seeds one engine would use)
    assert engines[0].settings.seed == 100 and engines[1].settings.seed == 104
    assert batch.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.prompt_ids.shape == (6, 3) and batch.prompt_ids[5].tolist() == [3, 3, 3]
    assert batch.response_ids.shape == (6, 3)  # padded to the widest engine's responses
    assert batch.response_mask[:4, 2].tolist() == [0.0] * 4 and batch.response_ids[0, 2].item() == 0
    assert batch.stats == {"prompts_in": 3, "responses": 6}


def test_merge_offsets_group_index_past_dropped_prompts():
    first = _batch([[1], [2]], 1, 0)
    first = RolloutBatch(**{**first.__dict__, "prompt_index": torch.tensor([0, 2])})  # prompt 1 dropped
    merged = merge_rollout_batches([first, _batch([[4]], 1, 0)], [0, 3])
    assert merged.prompt_index.tolist() == [0, 2, 3] and merged.group_index.tolist() == [0, 1, 2]


def test_merge_keeps_the_engines_response_texts_in_row_order():
    from dataclasses import replace

    first, second = _batch([[1], [2]], 2, 0), _batch([[4]], 2, 1)
    first = replace(first, response_texts=["a0", "a1", "b0", "b1"])
    merged = merge_rollout_batches([first, replace(second, response_texts=["c0", "c1"])], [0, 2])
    assert merged.response_texts == ["a0", "a1", "b0", "b1", "c0", "c1"]
    assert merge_rollout_batches([first, second], [0, 2]).response_texts is None  # one engine sent none


class _StreamingEngine(_Engine):
    """Streams like RolloutEngine.generate_stream: admitted groups (prompts of length 2 are
    "dropped"), groups finishing in reverse order, then the batch of the admitted prompts."""

    def generate_stream(self, prompts, settings):
        from megatron_rlhf.rollout.stream import AdmittedPrompts, FinishedGroup

        n = settings.n
        kept = [i for i, p in enumerate(prompts) if len(p) != 2]
        yield AdmittedPrompts(tuple(kept), n)
        batch = _batch([prompts[i] for i in kept], n, self.tag)
        batch = RolloutBatch(**{**batch.__dict__, "prompt_index": torch.tensor([kept[g] for g in batch.group_index])})
        for group in reversed(range(len(kept))):
            rows = range(group * n, (group + 1) * n)
            yield FinishedGroup(group, kept[group], tuple(tuple(batch.response_ids[r].tolist()) for r in rows))
        yield batch


def test_pool_stream_numbers_groups_as_the_merged_batch():
    from megatron_rlhf.rollout.stream import AdmittedPrompts, FinishedGroup, last_item

    prompts = [[1], [2, 2], [3, 3, 3], [4], [5, 5], [6, 6, 6]]
    events = list(EnginePool([_StreamingEngine(0), _StreamingEngine(1)]).generate_stream(prompts, SamplingSettings(n=2)))
    admitted, groups, batch = events[0], events[1:-1], events[-1]
    assert isinstance(admitted, AdmittedPrompts) and admitted.prompt_index == (0, 2, 3, 5)
    assert all(isinstance(g, FinishedGroup) for g in groups) and sorted(g.group for g in groups) == [0, 1, 2, 3]
    assert batch.prompt_index.tolist() == [0, 0, 2, 2, 3, 3, 5, 5]
    for group in groups:  # each group's responses are its rows of the merged batch
        assert admitted.prompt_index[group.group] == group.prompt_index
        for k, row in enumerate(group.rows(2)):
            length = int(batch.response_mask[row].sum())
            assert tuple(batch.response_ids[row, :length].tolist()) == group.responses[k]
            assert batch.prompt_index[row].item() == group.prompt_index
    again = last_item(EnginePool([_StreamingEngine(0), _StreamingEngine(1)]).generate_stream(prompts, SamplingSettings(n=2)))
    assert torch.equal(again.response_ids, batch.response_ids)
