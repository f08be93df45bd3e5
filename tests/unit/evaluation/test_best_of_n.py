"""Best-of-N selection as a pure function of scores [P, N] and correctness [P, N], the scorer
adapters, the report files and the CLI's scorer specs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_rlhf.evaluation.best_of_n import (
    BestOfNReport,
    SampledResponses,
    aggregate_result,
    best_of_n_accuracy,
    bon_sizes,
    evaluate_best_of_n,
    pass_at_n,
    random_choice_accuracy,
    random_scorer,
    write_report,
)
from megatron_rlhf.cli.eval_bon import ScorerSpec, parse_scorer_spec
from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus, Verdict

CORRECT = torch.tensor([
    [0, 1, 0, 1],
    [0, 0, 0, 0],
    [1, 1, 1, 1],
    [0, 0, 1, 0],
], dtype=torch.bool)


@pytest.mark.parametrize("n_max,sizes", [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (16, [1, 2, 4, 8, 16])])
def test_sizes_are_powers_of_two_up_to_n_max(n_max, sizes):
    assert bon_sizes(n_max) == sizes


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_sizes_refuse_a_bad_n_max(bad):
    with pytest.raises(ValueError, match="N_max"):
        bon_sizes(bad)


def test_selection_by_hand():
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.95],  # N=1 -> wrong, N=2 -> wrong (0.9), N=4 -> right (0.95)
        [0.1, 0.2, 0.3, 0.4],   # never right
        [0.0, 0.0, 0.0, 0.0],   # all tied, all right
        [0.5, 0.1, 0.7, 0.2],   # N=4 picks index 2: right
    ], dtype=torch.float64)
    assert best_of_n_accuracy(scores, CORRECT, [1, 2, 4]) == [0.25, 0.25, 0.75]


def test_perfect_scorer_reaches_pass_at_n_and_a_constant_one_random_choice():
    sizes = [1, 2, 4]
    assert best_of_n_accuracy(CORRECT.double(), CORRECT, sizes) == pass_at_n(CORRECT, sizes) == [0.25, 0.5, 0.75]
    assert best_of_n_accuracy(torch.zeros(4, 4), CORRECT, sizes) == random_choice_accuracy(CORRECT, sizes)
    assert random_choice_accuracy(CORRECT, sizes) == [0.25, 0.375, 7 / 16]
    # an adversarial scorer picks a wrong response whenever there is one
    assert best_of_n_accuracy(-CORRECT.double(), CORRECT, sizes) == [0.25, 0.25, 0.25]


def test_ties_count_the_fraction_of_tied_responses_that_are_correct():
    correct = torch.tensor([[1, 0, 0, 1]], dtype=torch.bool)
    scores = torch.tensor([[2.0, 2.0, 2.0, 1.0]])
    assert best_of_n_accuracy(scores, correct, [1, 2, 4]) == pytest.approx([1.0, 0.5, 1 / 3])


def test_nan_scores_never_win_unless_all_are_nan():
    correct = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([[math.nan, -5.0, math.nan, math.nan], [math.nan] * 4])
    assert best_of_n_accuracy(scores, correct, [2, 4]) == pytest.approx([(1 + 0.5) / 2, (1 + 0.25) / 2])


def test_shapes_and_sizes_are_checked():
    with pytest.raises(ValueError, match=r"\[P, N\]"):
        best_of_n_accuracy(torch.zeros(4, 3), CORRECT, [1])
    with pytest.raises(ValueError, match="sizes"):
        best_of_n_accuracy(torch.zeros(4, 4), CORRECT, [8])


def test_a_random_scorer_matches_random_choice_in_expectation():
    generator = torch.Generator().manual_seed(0)
    correct = torch.rand(4000, 8, generator=generator) < 0.3
    scorer = random_scorer(seed=1)
    scores = torch.tensor(scorer([None] * correct.numel())).reshape(correct.shape)
    sampled = best_of_n_accuracy(scores, correct, [1, 2, 4, 8])
    expected = random_choice_accuracy(correct, [1, 2, 4, 8])
    # 4000 prompts: the standard error of an accuracy near 0.3 is 0.0072
    assert max(abs(a - b) for a, b in zip(sampled, expected)) < 4 * 0.0073


def test_prm_aggregates_and_unscorable_results():
    prm = RewardResult(0.5, RewardStatus.SCORED, Verdict.OK, step_rewards=(0.9, 0.4, 0.5))
    assert aggregate_result(prm) == 0.5
    assert aggregate_result(prm, "min") == 0.4
    assert aggregate_result(prm, "last") == 0.5
    assert aggregate_result(prm, "product") == pytest.approx(0.18)
    assert aggregate_result(prm, "mean") == pytest.approx(0.6)
    assert aggregate_result(RewardResult.correct(), "min") == 1.0  # no steps: the reward
    assert math.isnan(aggregate_result(RewardResult.infra_error(Verdict.UNPARSEABLE_JUDGEMENT, "?")))
    with pytest.raises(ValueError, match="aggregate"):
        aggregate_result(prm, "median")


def test_evaluation_scores_every_response_once_and_reports_unscored(tmp_path):
    samples = [[RewardSample(f"{p}/{n}", "math", "q", f"r{p}{n}", "1") for n in range(4)] for p in range(4)]
    responses = SampledResponses(samples, CORRECT, prompts_dropped=1, grading_errors=2)
    seen = []

    def by_response_text(batch):
        seen.extend(sample.sample_id for sample in batch)
        return [float(CORRECT[int(s.response[1]), int(s.response[2])]) if s.response != "r00" else math.nan
                for s in batch]

    report = evaluate_best_of_n(responses, {"oracle-like": by_response_text})
    assert sorted(seen) == sorted(s.sample_id for group in samples for s in group)
    assert report.sizes == [1, 2, 4] and report.prompts == 4 and report.prompts_dropped == 1
    assert report.scorers["oracle-like"] == report.oracle and report.unscored == {"oracle-like": 1}


def test_report_files(tmp_path):
    report = BestOfNReport([1, 2, 4], [0.3, 0.5, 0.7], [0.3, 0.3, 0.3], {"orm": [0.3, 0.4, 0.45]}, prompts=10)
    paths = write_report(report, tmp_path / "out")
    table = paths["md"].read_text()
    assert "| N | oracle (pass@N) | random choice | orm |" in table and "| 4 | 0.700 | 0.300 | 0.450 |" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["scorers"] == {"orm": [0.3, 0.4, 0.45]}


@pytest.mark.parametrize("text,spec", [
    ("random", ScorerSpec("random")),
    ("verifier", ScorerSpec("verifier")),
    ("rm:/ckpt/prm", ScorerSpec("rm", "/ckpt/prm")),
    ("rm:/ckpt/prm:min,last", ScorerSpec("rm", "/ckpt/prm", aggregates=("min", "last"))),
    ("genrm:/judge:noref", ScorerSpec("genrm", "/judge", with_reference=False)),
    ("genrm:/judge", ScorerSpec("genrm", "/judge")),
])
def test_scorer_specs(text, spec):
    assert parse_scorer_spec(text) == spec


def test_scorer_spec_names():
    assert ScorerSpec("rm", "/ckpt/prm", aggregates=("outcome", "min")).names() == ["rm:prm", "rm:prm:min"]
    assert ScorerSpec("genrm", "/x/judge", with_reference=False).names() == ["genrm:judge:noref"]


@pytest.mark.parametrize("text,message", [
    ("orm:/x", "unknown kind"), ("rm", "needs a path"), ("rm:/x:median", "unknown aggregate"),
    ("genrm:/x:maybe", "'ref' or 'noref'"), ("random:3", "takes no arguments"),
])
def test_bad_scorer_specs_name_the_value(text, message):
    with pytest.raises(ValueError, match=message):
        parse_scorer_spec(text)
