"""Pure checks of how scalar heads are read: last real token (reward), step boundaries (PRM)."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.models.heads import ROLES, gather_at_positions, last_token_scores


def test_reward_is_read_at_the_last_real_token_of_each_row():
    scores = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    assert last_token_scores(scores, torch.tensor([6, 2])).tolist() == [5.0, 7.0]


@pytest.mark.parametrize("lengths", [[0, 3], [7, 1]])
def test_reward_rejects_lengths_outside_the_sequence(lengths):
    with pytest.raises(ValueError, match="sequence_lengths must be in"):
        last_token_scores(torch.zeros(2, 6), torch.tensor(lengths))


def test_reward_rejects_a_lengths_shape_mismatch():
    with pytest.raises(ValueError, match="must have shape"):
        last_token_scores(torch.zeros(2, 6), torch.tensor([1, 2, 3]))


def test_prm_scores_are_gathered_at_step_boundaries_with_padding():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]])
    positions = torch.tensor([[1, 3], [0, -1]])
    expected = torch.tensor([[0.2, 0.4], [1.0, 0.0]])
    assert torch.equal(gather_at_positions(scores, positions), expected)


def test_roles():
    assert ROLES == ("lm", "value", "reward", "prm")
