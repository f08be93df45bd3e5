"""The choice of a general task's GenRM reference: the reward model's best of N (pure selection)."""

from __future__ import annotations

import math

import pytest

from megatron_rlhf.evaluation.bon_reference import BoNReferenceConfig, pick_references


def test_the_highest_score_wins_and_the_first_of_a_tie():
    assert pick_references([["a", "b", "c"], ["x", "y"]], [[0.1, 0.9, 0.5], [2.0, 2.0]]) == ["b", "x"]


def test_nan_never_wins_and_all_nan_gives_no_reference():
    assert pick_references([["a", "b"]], [[math.nan, -5.0]]) == ["b"]
    assert pick_references([["a", "b"], []], [[math.nan, math.nan], []]) == [None, None]


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="prompt 0"):
        pick_references([["a", "b"]], [[1.0]])
    with pytest.raises(ValueError, match="prompts"):
        pick_references([["a"]], [])


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n must be"):
        BoNReferenceConfig(n=0)
