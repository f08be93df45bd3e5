"""Clipped value loss against a per-token scalar reference and hand cases."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.algorithms import AlgorithmConfigError, clipped_value_loss

from . import references
from .batches import mask_from_lengths, random_lengths, random_tokens, to_rows

EXACT64 = {"rtol": 1e-12, "atol": 1e-14}


@pytest.mark.parametrize("clip", [None, 0.2, 1.0])
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_matches_reference_on_random_batches(clip, reduction) -> None:
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        lengths = random_lengths(generator, 5, 7)
        mask = mask_from_lengths(lengths, 7)
        old_values = random_tokens(generator, mask)
        values = old_values + random_tokens(generator, mask, scale=0.5)
        returns = random_tokens(generator, mask)
        output = clipped_value_loss(values, old_values, returns, mask, clip, reduction)
        rows = [
            [references.value_token_loss(v, o, r, clip) for v, o, r in zip(vs, os, rs)]
            for vs, os, rs in zip(
                to_rows(values, lengths), to_rows(old_values, lengths), to_rows(returns, lengths)
            )
        ]
        torch.testing.assert_close(
            output.token_loss,
            torch.tensor(references.pad_rows(rows, 7), dtype=torch.float64),
            **EXACT64,
        )
        assert output.loss.item() == pytest.approx(
            references.reduce(rows, reduction), rel=1e-12, abs=1e-14
        )


def test_hand_computed_clipping() -> None:
    # V moved from 0 to 1, return 2, clip 0.2: clipped V = 0.2, loss 0.5 * max(1, 3.24) = 1.62.
    # V moved from 0 to 1, return 0.5: 0.5 * max(0.25, 0.09) = 0.125 (unclipped term larger).
    values = torch.tensor([[1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    output = clipped_value_loss(
        values,
        torch.zeros(1, 2, dtype=torch.float64),
        torch.tensor([[2.0, 0.5]], dtype=torch.float64),
        torch.ones(1, 2),
        value_clip=0.2,
    )
    torch.testing.assert_close(
        output.token_loss, torch.tensor([[1.62, 0.125]], dtype=torch.float64)
    )
    assert output.clip_fraction.item() == 0.5
    output.loss.backward()
    # the clipped branch decides token 0 and does not depend on V: zero gradient there.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.25]], dtype=torch.float64))


def test_empty_mask_and_padding_garbage() -> None:
    nan = torch.full((2, 2), float("nan"), requires_grad=True)
    output = clipped_value_loss(nan, nan, nan, torch.zeros(2, 2))
    output.loss.backward()
    assert output.loss.item() == 0.0 and output.clip_fraction.item() == 0.0
    assert torch.equal(nan.grad, torch.zeros(2, 2))


def test_invalid_clip_raises() -> None:
    with pytest.raises(AlgorithmConfigError, match="value_clip must be > 0 or None; got 0"):
        clipped_value_loss(
            torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), 0.0
        )
