"""Pre-PPO selection on hand-computed cases: per-domain z-scores, the lowest fraction kept (per
domain or globally), merge modes, and the driver calling real sampling/scoring functions."""

from __future__ import annotations

import math

import pytest

from megatron_rlhf.data.pre_ppo import (
    PrePPOConfig,
    aggregate_prompt_scores,
    keep_count,
    merge_selection,
    normalize_within_domains,
    pre_ppo_select,
    select_lowest,
    select_prompts,
)
from megatron_rlhf.data.prompts import PromptRecord

# math prompt scores 1, 2, 3 (mean 2, population std sqrt(2/3)); code 10, 30 (mean 20, std 10).
DOMAINS = ["math", "code", "math", "code", "math"]
PROMPT_SCORES = [1.0, 10.0, 2.0, 30.0, 3.0]
Z_MATH = 1.0 / math.sqrt(2.0 / 3.0)  # 1.2247...
EXPECTED_Z = [-Z_MATH, -1.0, 0.0, 1.0, Z_MATH]


def _prompts() -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", domain, f"prompt {i}", None) for i, domain in enumerate(DOMAINS)]


def test_response_scores_are_aggregated_per_prompt() -> None:
    rows = [[0.0, 2.0], [10.0], [1.0, 3.0, 2.0], [40.0, 20.0], [3.0, 3.0]]
    assert aggregate_prompt_scores(rows, "mean") == PROMPT_SCORES
    assert aggregate_prompt_scores(rows, "min") == [0.0, 10.0, 1.0, 20.0, 3.0]
    assert aggregate_prompt_scores(rows, "max") == [2.0, 10.0, 3.0, 40.0, 3.0]


def test_bad_scores_name_the_prompt() -> None:
    with pytest.raises(ValueError, match=r"prompt 'p1' has a non-finite"):
        aggregate_prompt_scores([[1.0], [float("nan")]], ids=["p0", "p1"])
    with pytest.raises(ValueError, match=r"prompt #0 has no response scores"):
        aggregate_prompt_scores([[]])


def test_scores_are_z_normalised_within_each_domain() -> None:
    assert normalize_within_domains(PROMPT_SCORES, DOMAINS) == pytest.approx(EXPECTED_Z, abs=1e-12)
    # a domain whose prompts all score the same carries no ranking information: 0
    assert normalize_within_domains([5.0, 5.0, 1.0, 3.0], ["a", "a", "b", "b"]) == [0.0, 0.0, -1.0, 1.0]


def test_keep_count_is_the_ceiling_robust_to_round_off() -> None:
    assert [keep_count(10, 0.3), keep_count(3, 0.5), keep_count(4, 0.5), keep_count(1, 0.01), keep_count(0, 0.5)] == [
        3, 2, 2, 1, 0
    ]


def test_per_domain_scope_keeps_the_lowest_fraction_of_every_domain() -> None:
    # math: ceil(1.5) = 2 lowest -> p0 (1.0), p2 (2.0); code: ceil(1.0) = 1 -> p1 (10.0)
    assert select_lowest(EXPECTED_Z, DOMAINS, 0.5, "per_domain") == [0, 1, 2]


def test_global_scope_ranks_the_normalised_scores_across_domains() -> None:
    # ceil(0.4 * 5) = 2: z = -1.22 (p0, math) and -1.0 (p1, code). On raw scores it would be p0 and p2.
    assert select_lowest(EXPECTED_Z, DOMAINS, 0.4, "global") == [0, 1]
    assert select_lowest(PROMPT_SCORES, DOMAINS, 0.4, "global") == [0, 2]


def test_ties_are_broken_by_input_position() -> None:
    assert select_lowest([0.0, -1.0, 0.0, 0.0], ["a"] * 4, 0.5) == [0, 1]


def test_merge_modes() -> None:
    prompts = _prompts()
    assert merge_selection(prompts, [0, 2], "selected_only") == [prompts[0], prompts[2]]
    union = merge_selection(prompts, [0, 2], "union", upweight_copies=2)
    assert [r.id for r in union] == ["p0", "p1", "p2", "p3", "p4", "p0", "p2", "p0", "p2"]
    original = [PromptRecord("old", "math", "old prompt", None)]
    assert [r.id for r in merge_selection(prompts, [4], "union", 1, original)] == ["old", "p4"]


def test_pre_ppo_select_chains_the_steps() -> None:
    result = pre_ppo_select(_prompts(), [[s] for s in PROMPT_SCORES], PrePPOConfig(keep_fraction=0.5))
    assert result.selected == (0, 1, 2)
    assert result.normalized_scores == pytest.approx(EXPECTED_Z, abs=1e-12)
    assert [r.id for r in result.merged] == ["p0", "p1", "p2", "p3", "p4", "p0", "p1", "p2"]
    assert (result.domains["math"].candidates, result.domains["math"].selected) == (3, 2)
    assert result.domains["code"].mean_score == 20.0 and result.domains["code"].std_score == 10.0


def test_driver_samples_scores_in_chunks_and_selects() -> None:
    calls: list[tuple[list[str], int]] = []

    def sample_fn(prompts, n):  # a deterministic "policy": the response repeats the prompt's number
        calls.append(([p.id for p in prompts], n))
        return [[p.prompt.split()[-1] * (k + 1) for k in range(n)] for p in prompts]

    def score_fn(prompts, responses):  # a deterministic "reward model": the score table above
        return [[PROMPT_SCORES[int(p.id[1:])]] * len(rs) for p, rs in zip(prompts, responses)]

    config = PrePPOConfig(keep_fraction=0.4, scope="global", merge="selected_only", samples_per_prompt=3, chunk_size=2)
    result = select_prompts(_prompts(), sample_fn, score_fn, config)
    assert calls == [(["p0", "p1"], 3), (["p2", "p3"], 3), (["p4"], 3)]
    assert [r.id for r in result.merged] == ["p0", "p1"]


def test_driver_rejects_score_shapes_that_do_not_match() -> None:
    config = PrePPOConfig(samples_per_prompt=2)
    with pytest.raises(ValueError, match="1 scores for the 2 responses of prompt 'p0'"):
        select_prompts(_prompts(), lambda ps, n: [["a"] * n for _ in ps], lambda ps, rs: [[0.0] for _ in ps], config)


@pytest.mark.parametrize("bad", [
    {"keep_fraction": 0.0}, {"keep_fraction": 1.5}, {"scope": "domain"}, {"merge": "concat"},
    {"upweight_copies": 0}, {"aggregate": "median"},
])
def test_config_validation(bad) -> None:
    with pytest.raises(ValueError, match="pre_ppo"):
        PrePPOConfig(**bad)
