"""The one-step-off schedule's bookkeeping (trainer/one_step_off.py): prompts in synchronous order,
each step's own seed, staleness, the sampler state a checkpoint keeps, discarding the batch in
flight. Real prompt sampler and reward router; the engine is a deterministic stand-in that
streams like RolloutEngine.generate_stream (real engines: tests/integration/test_rl_async.py)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

from megatron_rlhf.data.prompts import PromptRecord, PromptSampler
from megatron_rlhf.rewards.router import DomainRoute, HybridRewardRouter, RouterConfig
from megatron_rlhf.rewards.verifiers.multiple_choice import MultipleChoiceConfig, MultipleChoiceVerifier
from megatron_rlhf.rollout.stream import AdmittedPrompts, FinishedGroup
from megatron_rlhf.trainer.one_step_off import OneStepOffRollouts
from megatron_rlhf.types import RolloutBatch


@dataclass(frozen=True)
class Sampling:
    n: int = 2
    seed: int = 0


class Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "Answer: " + "ABCD"[ids[0] % 4]


class Engine:
    """Answers prompt i with token (seed + i) for each of n responses; can be held mid-stream."""

    def __init__(self):
        self.calls: list[tuple[list, int]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def generate_stream(self, inputs, sampling):
        self.calls.append((list(inputs), sampling.seed))
        self.started.set()
        yield AdmittedPrompts(tuple(range(len(inputs))), sampling.n)
        self.release.wait(timeout=60)
        rows = []
        for group in range(len(inputs)):
            token = sampling.seed + group
            rows += [token] * sampling.n
            yield FinishedGroup(group, group, ((token,),) * sampling.n)
        count = len(rows)
        yield RolloutBatch(
            prompt_ids=torch.ones(count, 1, dtype=torch.long), prompt_lengths=torch.ones(count, dtype=torch.long),
            response_ids=torch.tensor(rows).unsqueeze(1), response_mask=torch.ones(count, 1),
            sampling_logprobs=torch.zeros(count, 1), finish_reasons=["stop"] * count,
            group_index=torch.arange(count) // sampling.n, prompt_index=torch.arange(count) // sampling.n,
            pad_token_id=0, stats={})


def _parts():
    records = [PromptRecord(f"p{i}", "mc", f"question {i}", None, "ABCD"[i % 4]) for i in range(5)]
    router = HybridRewardRouter(RouterConfig({"mc": DomainRoute({"choice": 1.0})}),
                                {"choice": MultipleChoiceVerifier(MultipleChoiceConfig())})
    return records, router


def _rollouts(records, router, engine, last_step=10, version=0, early_passes=None):
    sampler = PromptSampler(records, 2, seed=3)
    return OneStepOffRollouts(engine, sampler, lambda step: Sampling(seed=100 * step), Tokenizer(), router,
                              chat_template=False, last_step=last_step, engine_version=version,
                              early_passes=early_passes), sampler


def test_schedule_keeps_prompt_order_seeds_and_staleness():
    records, router = _parts()
    engine = Engine()
    rollouts, _ = _rollouts(records, router, engine, last_step=3)
    reference = PromptSampler(records, 2, seed=3)
    for step in range(3):
        prompts, batch, stream, staleness, early, _ = rollouts.take(step)
        assert early is None  # no early_passes given
        assert [p.id for p in prompts] == [p.id for p in reference.next_batch()]
        assert staleness == (0 if step == 0 else 1)
        results = stream.results(batch.num_samples)
        assert [r.reward for r in results] == [float("ABCD"[(100 * step + g) % 4] == prompts[g].ground_truth)
                                               for g in range(2) for _ in range(2)]
        rollouts.start(step + 1)  # the next batch, generated with this step's (not yet updated) weights
        rollouts.wait_generated()
        rollouts.synced(step + 1)
    assert [seed for _, seed in engine.calls] == [0, 100, 200]  # nothing started past the last step
    rollouts.close()


def test_the_reference_pass_of_a_background_batch_is_issued_as_soon_as_it_is_generated():
    records, router = _parts()
    engine, issued = Engine(), []

    def early_passes(batch):  # the run gives the reference group's start_logprobs
        issued.append((threading.current_thread().name, batch))
        return f"pending {len(issued)}"

    rollouts, _ = _rollouts(records, router, engine, last_step=3, early_passes=early_passes)
    first = rollouts.take(0)
    assert first.early is None and issued == []  # generated in the foreground: the step issues its own pass
    rollouts.start(1)
    rollouts.wait_generated()
    assert len(issued) == 1 and issued[0][0] == "rollout-step-1"  # on the generating thread, before the wait ends
    second = rollouts.take(1)
    assert second.early == "pending 1" and issued[0][1] is second.batch
    rollouts.close()


def test_checkpoint_sampler_state_is_from_before_the_batch_in_flight():
    records, router = _parts()
    engine = Engine()
    rollouts, sampler = _rollouts(records, router, engine)
    prompts, batch, stream, _, _, _ = rollouts.take(0)
    stream.results(batch.num_samples)
    engine.release.clear()  # hold the next generation mid-stream
    engine.started.clear()
    rollouts.start(1)
    assert engine.started.wait(timeout=60)
    saved = rollouts.sampler_state()
    in_flight = engine.calls[-1][0]
    engine.release.set()
    rollouts.close()  # discarded: never trained on
    resumed = PromptSampler(records, 2, seed=3)
    resumed.load_state_dict(saved)
    again = resumed.next_batch()  # a resumed run draws the discarded batch's prompts again
    assert in_flight == [p.rollout_input() for p in again]
    fresh = PromptSampler(records, 2, seed=3)
    fresh.next_batch()
    assert [p.id for p in again] == [p.id for p in fresh.next_batch()]
    assert sampler.state_dict() != saved  # the live sampler did move past them


def test_generation_errors_reach_the_step():
    records, router = _parts()

    class Failing(Engine):
        def generate_stream(self, inputs, sampling):
            yield AdmittedPrompts((0,), 2)
            raise RuntimeError("engine actor died")

    rollouts, _ = _rollouts(records, router, Failing())
    rollouts.start(0)
    with pytest.raises(RuntimeError, match="engine actor died"):
        rollouts.take(0)


def test_an_early_pass_that_fails_reaches_the_step():
    records, router = _parts()

    def early_passes(batch):
        raise RuntimeError("reference group died")

    rollouts, _ = _rollouts(records, router, Engine(), early_passes=early_passes)
    rollouts.take(0)
    rollouts.start(1)
    with pytest.raises(RuntimeError, match="reference group died"):
        rollouts.take(1)
    rollouts.close()  # nothing left in flight


def test_config_needs_disaggregated_engines_and_a_known_mode():
    from megatron_rlhf.trainer.rl_config import RLConfig

    with pytest.raises(ValueError, match="rollout_mode='one_step_off' needs placement: disaggregated"):
        RLConfig(policy_dir="p", out_dir="o", prompt_files=("x.jsonl",), rollout_mode="one_step_off")
    with pytest.raises(ValueError, match="rollout_mode='async'"):
        RLConfig(policy_dir="p", out_dir="o", prompt_files=("x.jsonl",), rollout_mode="async")
    config = RLConfig(policy_dir="p", out_dir="o", prompt_files=("x.jsonl",), rollout_mode="one_step_off",
                      placement="disaggregated")
    assert config.rollout_mode == "one_step_off"


def test_streamed_group_samples_equal_the_batch_reward_samples():
    from megatron_rlhf.rollout.stream import last_item
    from megatron_rlhf.trainer.rl_step import reward_samples
    from megatron_rlhf.trainer.rollout_phase import group_samples

    records, _ = _parts()
    prompts = records[:3]
    events = list(Engine().generate_stream([p.text for p in prompts], Sampling(n=2, seed=7)))
    batch = last_item(iter(events))
    streamed = dict(pair for event in events if isinstance(event, FinishedGroup)
                    for pair in group_samples(event, 2, prompts, Tokenizer(), step=5))
    expected = reward_samples(batch, [prompts[int(i)] for i in batch.prompt_index], Tokenizer(), 5)
    assert [streamed[row] for row in range(batch.num_samples)] == expected
