"""The three named loss reductions against list-based references; empty masks; parts."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.algorithms import (
    REDUCTIONS,
    UnknownNameError,
    entropy_bonus_loss,
    masked_reduce,
    reduction_parts,
)

from . import references
from .batches import mask_from_lengths, random_lengths, random_tokens, to_rows

NAMES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def test_registry_keys_are_exactly_the_documented_names() -> None:
    assert REDUCTIONS.names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_on_random_batches(name: str) -> None:
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        lengths = random_lengths(generator, 5, 8)
        mask = mask_from_lengths(lengths, 8)
        values = random_tokens(generator, mask)
        expected = references.reduce(to_rows(values, lengths), name)
        assert masked_reduce(values, mask, name).item() == pytest.approx(
            expected, rel=1e-12, abs=1e-15
        )


def test_hand_computed_difference_between_reductions() -> None:
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    mask = mask_from_lengths([4, 1, 0], 4)
    assert masked_reduce(values, mask, "token_mean").item() == pytest.approx(8 / 5)
    assert masked_reduce(values, mask, "seq_mean_token_sum").item() == pytest.approx(8 / 2)
    assert masked_reduce(values, mask, "seq_mean_token_mean").item() == pytest.approx(5 / 2)


@pytest.mark.parametrize("name", NAMES)
def test_empty_mask_gives_zero_not_nan(name: str) -> None:
    values = torch.full((3, 4), float("nan"), requires_grad=True)
    result = masked_reduce(values, torch.zeros(3, 4), name)
    result.backward()
    assert result.item() == 0.0 and torch.equal(values.grad, torch.zeros(3, 4))
    assert masked_reduce(torch.zeros(0, 4), torch.zeros(0, 4), name).item() == 0.0


def test_parts_combine_across_shards_into_global_token_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = mask_from_lengths([5, 1, 3, 0], 5)
    values = random_tokens(generator, mask, pad_value=0.0)
    shards = [reduction_parts(values[i : i + 2], mask[i : i + 2], "token_mean") for i in (0, 2)]
    combined = sum(p.numerator for p in shards) / sum(p.denominator for p in shards)
    assert combined.item() == pytest.approx(
        masked_reduce(values, mask, "token_mean").item(), rel=1e-12
    )


def test_unknown_reduction_lists_choices() -> None:
    with pytest.raises(
        UnknownNameError, match="token_mean, seq_mean_token_sum, seq_mean_token_mean"
    ):
        masked_reduce(torch.zeros(1, 1), torch.ones(1, 1), "mean")


def test_entropy_bonus_is_minus_coef_times_reduced_entropy() -> None:
    entropy = torch.tensor([[1.0, 3.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss = entropy_bonus_loss(entropy, mask, 0.01)
    loss.backward()
    assert loss.item() == pytest.approx(-0.02)
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.005, -0.005, 0.0]]))
    with pytest.raises(ValueError, match="entropy coefficient must be finite and >= 0; got -1"):
        entropy_bonus_loss(entropy, mask, -1.0)
