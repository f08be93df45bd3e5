"""Hybrid reward router: YAML configuration, weights, per-domain normalisation and clipping, the
infra-error guard that stops a run, and a learned source plugging in through the same interface."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import pytest

from megatron_rlhf.rewards.interface import InfraErrorGuard, InfraErrorPolicy, InfraErrorRateExceeded
from megatron_rlhf.rewards.reward_config import (
    SOURCE_KINDS,
    build_sources,
    load_reward_config,
    register_source_kind,
)
from megatron_rlhf.rewards.router import HybridRewardRouter, UnroutableSample
from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus, Verdict


@dataclasses.dataclass(frozen=True)
class LengthScorerConfig:
    per_word: float = 0.1
    """Reward per word of the response (a stand-in for a learned RM's scalar, with step rewards)."""


class LengthScorer:
    """A real RewardSource with step rewards: one step per line, each scored by its word count."""

    name = "length"

    def __init__(self, config: LengthScorerConfig) -> None:
        self.config = config

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        results = []
        for sample in samples:
            if sample.response == "CRASH":
                results.append(RewardResult.infra_error(Verdict.SCORER_ERROR, "reward server unreachable"))
                continue
            steps = tuple(len(line.split()) * self.config.per_word for line in sample.response.splitlines())
            results.append(RewardResult(sum(steps), RewardStatus.SCORED, Verdict.OK, step_rewards=steps))
        return results

    def close(self) -> None:
        pass


if "test_length" not in SOURCE_KINDS:
    register_source_kind("test_length", LengthScorerConfig, LengthScorer)

CONFIG = """
infra_errors: {max_rate: 0.25, window: 8, min_samples: 4}
sources:
  choice: {kind: multiple_choice, default_choices: 4}
  length: {kind: test_length, per_word: 0.5}
domains:
  multiple_choice: {sources: {choice: 1.0, length: 0.5}, clip: [-1.0, 1.2]}
  general_chat: {sources: {length: 2.0}, normalization: batch_zscore}
  running: {sources: {length: 1.0}, normalization: running_zscore}
"""


@pytest.fixture()
def router(tmp_path: Path):
    path = tmp_path / "rewards.yaml"
    path.write_text(CONFIG)
    config = load_reward_config(path)
    built = HybridRewardRouter(config.router, build_sources(config))
    yield built
    built.close()


def _s(domain: str, response: str, ground_truth=None, sample_id: str = "x") -> RewardSample:
    return RewardSample(sample_id, domain, "", response, ground_truth)


def test_weights_and_clipping(router) -> None:
    right, wrong = router.score([_s("multiple_choice", "Answer: B", "B"), _s("multiple_choice", "Answer: C", "B")])
    assert right.reward == pytest.approx(1.2)  # 1.0 * 1 + 0.5 * (2 words * 0.5) = 1.5, clipped to 1.2
    assert wrong.reward == pytest.approx(0.5) and wrong.status is RewardStatus.FAILED_VERIFICATION
    assert wrong.verdict is Verdict.WRONG_ANSWER


def test_batch_zscore_per_domain(router) -> None:
    results = router.score([_s("general_chat", "a"), _s("general_chat", "a b c"), _s("multiple_choice", "B", "B")])
    assert results[0].reward == pytest.approx(-2.0, rel=1e-4) and results[1].reward == pytest.approx(2.0, rel=1e-4)
    assert results[2].reward == pytest.approx(1.2)  # the other domain is not normalised with them


def test_running_zscore_remembers_earlier_batches(router) -> None:
    router.score([_s("running", "a b c d")])
    (later,) = router.score([_s("running", "a")])
    assert later.reward < 0


def test_step_rewards_are_weighted(router) -> None:
    (result,) = router.score([_s("multiple_choice", "Answer: B\nyes", "B")])
    assert result.step_rewards == pytest.approx((0.5, 0.25))


def test_infra_errors_are_excluded_and_stop_the_run_above_the_rate(router) -> None:
    batch = [_s("general_chat", "fine words"), _s("general_chat", "CRASH"), _s("general_chat", "more words"),
             _s("general_chat", "ok")]
    results = router.score(batch)
    assert results[1].status is RewardStatus.INFRA_ERROR and results[1].reward is None
    assert router.last_update_mask == [True, False, True, True]
    with pytest.raises(InfraErrorRateExceeded, match="could not be scored") as stop:
        router.score([_s("general_chat", "CRASH"), _s("general_chat", "CRASH")])
    assert len(stop.value.results) == 2


def test_guard_waits_for_min_samples_and_uses_a_window() -> None:
    guard = InfraErrorGuard(InfraErrorPolicy(max_rate=0.5, window=4, min_samples=3))
    bad = RewardResult.infra_error(Verdict.SCORER_ERROR, "x")
    good = RewardResult.correct()
    assert guard.observe([bad, bad]) == [False, False]  # 2 samples: not judged yet
    guard2 = InfraErrorGuard(InfraErrorPolicy(max_rate=0.5, window=4, min_samples=3))
    guard2.observe([good, good, good, good, bad, bad])  # window holds good, good, bad, bad: 0.5
    with pytest.raises(InfraErrorRateExceeded):
        guard2.observe([bad])


def test_unknown_domain_names_the_sample(router) -> None:
    with pytest.raises(UnroutableSample, match="sample 'q17': domain 'poetry'"):
        router.score([_s("poetry", "x", sample_id="q17")])


@pytest.mark.parametrize("text, message", [
    ("domains: {math: {sources: {nope: 1.0}}}", "undefined source"),
    ("sources: {a: {kind: reward_model_9000}}\ndomains: {x: {sources: {a: 1}}}", "unknown reward source kind"),
    ("sources: {a: {kind: multiple_choice, colour: red}}\ndomains: {x: {sources: {a: 1}}}", "unknown key"),
    ("sources: {a: {kind: multiple_choice}}\ndomains: {x: {sources: {a: 1}, normalization: magic}}", "normalization"),
    ("sources: {a: {kind: code_verifier, sandbox: {limits: {memory_bytes: 5}}}}\ndomains: {x: {sources: {a: 1}}}", "memory_bytes"),
    ("infra_errors: {max_rate: 2}\nsources: {a: {kind: multiple_choice}}\ndomains: {x: {sources: {a: 1}}}", "max_rate"),
    ("domains: [", "not valid YAML"),
])
def test_bad_config_names_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_reward_config(path)
    assert str(path) in str(error.value)


def test_nested_sandbox_config_is_typed(tmp_path: Path) -> None:
    path = tmp_path / "code.yaml"
    path.write_text("sources: {c: {kind: code_verifier, limits: {wall_seconds: 3}, sandbox: {max_concurrency: 4}}}\n"
                    "domains: {code: {sources: {c: 1}}}")
    spec = load_reward_config(path).sources["c"]
    assert spec.config.limits.wall_seconds == 3 and spec.config.sandbox.max_concurrency == 4


def _rewards(results) -> list:
    return [result.reward for result in results]


def test_router_state_resumes_running_zscore_and_the_infra_error_window(tmp_path: Path) -> None:
    """A router rebuilt from a checkpoint of another's state scores the next batches exactly as
    the uninterrupted router does: running moments and the infra-error window travel with it."""
    import torch

    path = tmp_path / "rewards.yaml"
    path.write_text(CONFIG)
    config = load_reward_config(path)
    batches = [
        [_s("running", "a b c d"), _s("general_chat", "CRASH"), _s("running", "a")],  # 3 seen: not judged
        [_s("running", "a b"), _s("running", "a b c d e f"), _s("general_chat", "z")],  # 1 of 6
        [_s("general_chat", "CRASH")],  # 2 of 7 > 0.25 stops; without batch 0 it is 1 of 4, not judged above
    ]
    uninterrupted = HybridRewardRouter(config.router, build_sources(config))
    first = uninterrupted.score(batches[0])
    saved = tmp_path / "state.pt"
    torch.save(uninterrupted.state_dict(), saved)  # what the train-state checkpoint does with it
    expected = _rewards(uninterrupted.score(batches[1]))
    with pytest.raises(InfraErrorRateExceeded):
        uninterrupted.score(batches[2])

    resumed = HybridRewardRouter(config.router, build_sources(config))
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert _rewards(resumed.score(batches[1])) == expected
    with pytest.raises(InfraErrorRateExceeded):
        resumed.score(batches[2])
    assert resumed.guard.total_samples == uninterrupted.guard.total_samples == 7
    # a router without the state scores batch 1 differently and lets batch 2 through
    fresh = HybridRewardRouter(config.router, build_sources(config))
    assert _rewards(fresh.score(batches[1])) != expected
    fresh.score(batches[2])
    assert first[1].reward is None
