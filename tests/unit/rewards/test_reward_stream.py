"""Streaming rewards (rewards/streaming.py) equal the router's batch rewards, with the real code
sandbox, a verifier and a per-sample scorer working at once, pieces arriving in any order."""

from __future__ import annotations

import dataclasses
import random
import threading
from typing import Sequence

import pytest

from megatron_rlhf.rewards.interface import InfraErrorPolicy
from megatron_rlhf.rewards.router import DomainRoute, HybridRewardRouter, RouterConfig
from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus, Verdict
from megatron_rlhf.rewards.streaming import RewardStream, score_in_pieces
from megatron_rlhf.rewards.verifiers.multiple_choice import MultipleChoiceConfig, MultipleChoiceVerifier

from .test_code_verifier import HAS_CLOSE, _humaneval


class WordScorer:
    """A per-sample scorer with step rewards (a learned scorer's stand-in); records its calls."""

    name = "words"

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.called = threading.Event()

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        self.calls.append(len(samples))
        self.called.set()
        results = []
        for sample in samples:
            if sample.response == "CRASH":
                results.append(RewardResult.infra_error(Verdict.SCORER_ERROR, "reward server unreachable"))
                continue
            steps = tuple(0.25 * len(line.split()) for line in sample.response.splitlines())
            results.append(RewardResult(sum(steps), RewardStatus.SCORED, Verdict.OK, step_rewards=steps))
        return results

    def close(self) -> None:
        pass


class Broken(WordScorer):
    def score(self, samples):
        raise RuntimeError("scorer process died")


def _router(code_verifier, words=None) -> HybridRewardRouter:
    config = RouterConfig(
        domains={
            "code": DomainRoute({"code": 1.0, "words": 0.1}),
            "multiple_choice": DomainRoute({"choice": 1.0, "words": 0.5}, clip=(-1.0, 1.2)),
            "general_chat": DomainRoute({"words": 2.0}, normalization="batch_zscore"),
            "running": DomainRoute({"words": 1.0}, normalization="running_zscore"),
        },
        infra_errors=InfraErrorPolicy(max_rate=0.5, window=64, min_samples=4),
    )
    return HybridRewardRouter(config, {"code": code_verifier, "choice": MultipleChoiceVerifier(MultipleChoiceConfig()),
                                       "words": words or WordScorer()})


def _batch(step: int) -> list[RewardSample]:
    good, wrong = HAS_CLOSE["completion"], HAS_CLOSE["wrong"]
    rows = [
        ("code", HAS_CLOSE["prompt"] + good, _humaneval(HAS_CLOSE)),
        ("code", HAS_CLOSE["prompt"] + wrong, _humaneval(HAS_CLOSE)),
        ("multiple_choice", "Answer: B\nbecause", "B"),
        ("multiple_choice", "Answer: C", "B"),
        ("general_chat", "a b c", None),
        ("general_chat", "CRASH", None),
        ("general_chat", "a\nb c d e", None),
        ("running", " ".join("w" for _ in range(step + 2)), None),
        ("running", "one", None),
    ]
    return [RewardSample(f"{step}:{i}", domain, "", response, truth) for i, (domain, response, truth) in enumerate(rows)]


def _plain(result: RewardResult) -> dict:
    return {k: v for k, v in dataclasses.asdict(result).items() if k != "seconds"}


def test_streamed_rewards_equal_batch_rewards(code_verifier) -> None:
    batch_router, stream_router = _router(code_verifier), _router(code_verifier)
    shuffle = random.Random(0)
    for step in range(3):  # running_zscore carries state from batch to batch
        samples = _batch(step)
        expected = batch_router.score(samples)
        rows = list(enumerate(samples))
        shuffle.shuffle(rows)
        pieces = [rows[:1], rows[1:4], rows[4:5], rows[5:]]  # groups finishing out of order
        streamed = score_in_pieces(stream_router, pieces)
        assert [_plain(r) for r in streamed] == [_plain(r) for r in expected]
        assert stream_router.last_update_mask == batch_router.last_update_mask
        assert stream_router.state_dict() == batch_router.state_dict()
    assert expected[0].reward == pytest.approx(1.0 + 0.1 * expected[0].raw_score - 1.0, abs=10)  # scored at all
    assert expected[0].status is RewardStatus.SCORED and expected[1].status is RewardStatus.FAILED_VERIFICATION


def test_sources_start_before_the_batch_is_complete(code_verifier) -> None:
    words = WordScorer()
    stream = RewardStream(_router(code_verifier, words))
    samples = _batch(0)
    stream.add([(4, samples[4])])
    assert words.called.wait(timeout=60)  # scoring ran while the rest of the batch was "generating"
    stream.add((i, s) for i, s in enumerate(samples) if i != 4)
    results = stream.results(len(samples))
    assert len(results) == len(samples) and results[5].reward is None
    assert sum(words.calls) == len(samples)  # every sample is routed to it, each scored exactly once


def test_a_failing_source_and_missing_rows_are_raised(code_verifier) -> None:
    stream = RewardStream(_router(code_verifier, Broken()))
    stream.add([(0, _batch(0)[4])])
    with pytest.raises(RuntimeError, match="scorer process died"):
        stream.results(1)
    stream = RewardStream(_router(code_verifier))
    stream.add([(1, _batch(0)[2])])
    with pytest.raises(ValueError, match="missing"):
        stream.results(2)
    with pytest.raises(ValueError, match="twice"):
        RewardStream(_router(code_verifier)).add([(0, _batch(0)[2]), (0, _batch(0)[3])])
