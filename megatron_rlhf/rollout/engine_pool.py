"""Rollout data parallelism: several engines (each with its own vLLM TP size) serve one batch.

:class:`EnginePool` splits a request's prompts into contiguous chunks, one per engine (sizes
differ by at most one), generates on all engines at once and merges the results with
:func:`merge_rollout_batches` into the batch a single engine would have returned for the same
prompts: ``prompt_index`` refers to the caller's list, ``group_index`` numbers the admitted
prompts in order, rows are in prompt order, the statistics are summed.

Streaming (:meth:`EnginePool.generate_stream`): each engine streams on its own thread; groups are
forwarded as any engine finishes them, numbered as in the merged batch.

Guarantee: every prompt goes to exactly one engine; the pool is a drop-in engine for the actor
(``generate``, ``release_memory``, ``wake``); with a seed, each prompt's samples get the seeds
one engine would give them (:func:`settings_from`). Not guaranteed: bitwise the same samples as
one engine (another batch composition can change the logits in the last bits), load balance by
generated length.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import torch

from megatron_rlhf.rollout.stream import AdmittedPrompts, FinishedGroup

from megatron_rlhf.types import RolloutBatch


def split_prompts(num_prompts: int, num_engines: int) -> list[range]:
    """Contiguous prompt ranges, one per engine, whose sizes differ by at most one."""
    if num_engines < 1:
        raise ValueError(f"num_engines={num_engines} must be >= 1")
    base, extra = divmod(num_prompts, num_engines)
    ranges, start = [], 0
    for engine in range(num_engines):
        stop = start + base + (engine < extra)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def settings_from(settings: Any, first_prompt: int) -> Any:
    """The settings of an engine given the prompts from ``first_prompt`` on: its seed moved on by
    ``first_prompt * n``, so each prompt's samples get the seeds they would get on one engine (an
    engine seeds prompt ``i`` of its call ``seed + i * n``)."""
    if settings.seed is None or first_prompt == 0:
        return settings
    return dataclasses.replace(settings, seed=settings.seed + first_prompt * settings.n)


def _pad_to(tensor: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    padded = torch.full((tensor.shape[0], width), value, dtype=tensor.dtype)
    padded[:, : tensor.shape[1]] = tensor
    return padded


def merge_rollout_batches(batches: Sequence[RolloutBatch], prompt_starts: Sequence[int]) -> RolloutBatch:
    """One batch from per-engine batches of prompts starting at ``prompt_starts`` (pure)."""
    if not batches:
        raise ValueError("no batches to merge")
    pad = batches[0].pad_token_id
    prompt_width = max(b.prompt_ids.shape[1] for b in batches)
    response_width = max(b.response_ids.shape[1] for b in batches)
    groups_before, group_indices, prompt_indices = 0, [], []
    for batch, start in zip(batches, prompt_starts):
        group_indices.append(batch.group_index + groups_before)
        prompt_indices.append(batch.prompt_index + start)
        groups_before += int(batch.group_index.max().item()) + 1 if batch.num_samples else 0
    stats: dict[str, int] = {}
    for batch in batches:
        for key, value in batch.stats.items():
            stats[key] = stats.get(key, 0) + value
    return RolloutBatch(
        prompt_ids=torch.cat([_pad_to(b.prompt_ids, prompt_width, pad) for b in batches]),
        prompt_lengths=torch.cat([b.prompt_lengths for b in batches]),
        response_ids=torch.cat([_pad_to(b.response_ids, response_width, pad) for b in batches]),
        response_mask=torch.cat([_pad_to(b.response_mask, response_width, 0.0) for b in batches]),
        sampling_logprobs=torch.cat([_pad_to(b.sampling_logprobs, response_width, 0.0) for b in batches]),
        finish_reasons=[reason for b in batches for reason in b.finish_reasons],
        group_index=torch.cat(group_indices),
        prompt_index=torch.cat(prompt_indices),
        pad_token_id=pad,
        stats=stats,
        response_texts=merged_texts(batches),
    )


def merged_texts(batches: Sequence[RolloutBatch]) -> list[str] | None:
    """The batches' response texts in merged row order; None unless every batch has them."""
    if any(batch.response_texts is None for batch in batches):
        return None
    return [text for batch in batches for text in batch.response_texts]


class EnginePool:
    """Several engines behind the single-engine interface the actor uses."""

    def __init__(self, engines: Sequence[Any]):
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = list(engines)

    def generate(self, prompts: Sequence[Any], settings: Any) -> RolloutBatch:
        ranges = split_prompts(len(prompts), len(self.engines))
        used = [(engine, part) for engine, part in zip(self.engines, ranges) if len(part)] or [
            (self.engines[0], ranges[0])]
        with ThreadPoolExecutor(max_workers=len(used)) as pool:
            futures = [pool.submit(engine.generate, [prompts[i] for i in part], settings_from(settings, part.start))
                       for engine, part in used]
            batches = [future.result() for future in futures]
        return merge_rollout_batches(batches, [part.start for _, part in used])

    def generate_stream(self, prompts: Sequence[Any], settings: Any) -> Iterator[Any]:
        """:mod:`.stream` events of all engines at once: their admitted groups numbered as in the
        merged batch, each group as its engine finishes it, then the merged batch."""
        ranges = split_prompts(len(prompts), len(self.engines))
        used = [(engine, part) for engine, part in zip(self.engines, ranges) if len(part)] or [
            (self.engines[0], ranges[0])]
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def pump(position: int, engine: Any, part: range) -> None:
            try:
                for event in engine.generate_stream([prompts[i] for i in part], settings_from(settings, part.start)):
                    events.put((position, event))
                    if stop.is_set():
                        break
            except BaseException as error:  # re-raised by the consumer
                events.put((position, error))

        threads = [threading.Thread(target=pump, args=(position, engine, part), daemon=True,
                                    name=f"engine-pool-{position}") for position, (engine, part) in enumerate(used)]
        for thread in threads:
            thread.start()
        try:
            admitted: dict[int, AdmittedPrompts] = {}
            batches: dict[int, RolloutBatch] = {}
            early: list[tuple[int, FinishedGroup]] = []
            offsets: list[int] = []
            while len(batches) < len(used):
                position, event = events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, AdmittedPrompts):
                    admitted[position] = event
                    if len(admitted) == len(used):  # every engine has announced its groups
                        counts = [len(admitted[p].prompt_index) for p in range(len(used))]
                        offsets = [sum(counts[:p]) for p in range(len(used))]
                        yield AdmittedPrompts(tuple(used[p][1].start + i for p in range(len(used))
                                                    for i in admitted[p].prompt_index), event.samples_per_group)
                        for held in early:
                            yield _shifted(held, offsets, used)
                        early.clear()
                elif isinstance(event, FinishedGroup):
                    if offsets:
                        yield _shifted((position, event), offsets, used)
                    else:
                        early.append((position, event))
                else:
                    batches[position] = event
            yield merge_rollout_batches([batches[p] for p in range(len(used))], [part.start for _, part in used])
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    def release_memory(self) -> bool:
        return any([engine.release_memory() for engine in self.engines])

    def wake(self, tags: Any = ("weights", "kv_cache")) -> None:
        for engine in self.engines:
            engine.wake(tags)

    def shutdown(self) -> None:
        for engine in self.engines:
            if hasattr(engine, "shutdown"):
                engine.shutdown()


def _shifted(item: tuple[int, FinishedGroup], offsets: list[int], used: list) -> FinishedGroup:
    """An engine's finished group renumbered as in the merged batch."""
    position, group = item
    return FinishedGroup(group.group + offsets[position], used[position][1].start + group.prompt_index,
                         group.responses, group.texts)
