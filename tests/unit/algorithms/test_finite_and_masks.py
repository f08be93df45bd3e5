"""Non-finite guards name the tensor and position; mask validation and layout helpers."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.algorithms import (
    BatchShapeError,
    NonFiniteError,
    broadcast_to_tokens,
    check_all_finite,
    check_finite,
    check_response_mask,
    place_at_last_token,
)
from megatron_rlhf.algorithms.registry import Registry


def test_check_finite_names_tensor_count_and_first_position() -> None:
    tensor = torch.tensor([[0.0, float("inf")], [float("nan"), 1.0]])
    with pytest.raises(
        NonFiniteError, match=r"old_logprobs has 2 non-finite value\(s\).*index \(0, 1\): inf"
    ):
        check_finite("old_logprobs", tensor)


def test_check_finite_ignores_masked_out_positions() -> None:
    tensor = torch.tensor([[0.0, float("nan")]])
    check_finite("values", tensor, torch.tensor([[1, 0]]))
    check_all_finite({"a": tensor, "b": None}, torch.tensor([[True, False]]))


def test_check_all_finite_reports_the_offending_tensor() -> None:
    good, bad = torch.zeros(1, 2), torch.tensor([[0.0, float("-inf")]])
    with pytest.raises(NonFiniteError, match="^ref_logprobs has 1"):
        check_all_finite({"logprobs": good, "ref_logprobs": bad})


@pytest.mark.parametrize(
    "mask,message",
    [
        (
            torch.tensor([[1, 0, 1]]),
            "right-padded; row 0 has a 0 at position 1 followed by a 1 at position 2",
        ),
        (torch.tensor([[1, 2, 0]]), "only 0/1; got 2 at \\[0, 1\\]"),
        (torch.ones(3), "must be \\[B, T\\]"),
    ],
)
def test_check_response_mask_rejects_bad_masks(mask: torch.Tensor, message: str) -> None:
    with pytest.raises(BatchShapeError, match=message):
        check_response_mask(mask)


def test_place_at_last_token_and_broadcast() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    scores = torch.tensor([2.0, 5.0, -1.0])
    assert place_at_last_token(scores, mask).tolist() == [
        [0.0, 2.0, 0.0],
        [0.0, 0.0, 0.0],
        [0.0, 0.0, -1.0],
    ]
    assert broadcast_to_tokens(scores, mask).tolist() == [
        [2.0, 2.0, 0.0],
        [0.0, 0.0, 0.0],
        [-1.0, -1.0, -1.0],
    ]


def test_registry_rejects_duplicates_and_unknown_names() -> None:
    registry: Registry[int] = Registry("widget")
    registry.add("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.add("a", 2)
    with pytest.raises(ValueError, match="unknown widget 'b'; registered: a"):
        registry.get("b")
