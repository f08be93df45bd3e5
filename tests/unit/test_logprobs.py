"""Single-process path of megatron_rlhf.models.logprobs (tp_group=None): CPU only, no spawn.

Every check compares against plain full-vocab ``torch.log_softmax`` on the same logits.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from megatron_rlhf.models.logprobs import (
    logprobs_and_entropy,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)

BATCH, SEQ, VOCAB = 3, 7, 40
# Agreement expected of two fp32 computations of the same quantity: 1e-6 absolute plus 1e-6 of
# the magnitude (torch's own fp32 log_softmax is ~1 ulp, i.e. ~2e-6, off at log p ~ -20).
EXACT = {"atol": 1e-6, "rtol": 1e-6}
BF16_ULP = {"atol": 1e-6, "rtol": 2.0**-8}


def _random_inputs(seed: int, vocab: int = VOCAB) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Logits [B, T, V], target ids [B, T] and loss weights for log-probs and entropy [B, T]."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(BATCH, SEQ, vocab, generator=generator)
    target_ids = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
    logprob_weights = torch.randn(BATCH, SEQ, generator=generator)
    entropy_weights = torch.randn(BATCH, SEQ, generator=generator)
    return logits, target_ids, logprob_weights, entropy_weights


def _reference(
    logits: Tensor, target_ids: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Full-vocab fp32 ``log_softmax`` gather and entropy, [B, T] each."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    target_logprobs = log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return target_logprobs, entropy


def _gradient(loss: Tensor, logits: Tensor) -> Tensor:
    (gradient,) = torch.autograd.grad(loss, logits)
    return gradient


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_match_log_softmax(temperature: float) -> None:
    logits, target_ids, _, _ = _random_inputs(0)
    expected_logprobs, expected_entropy = _reference(logits, target_ids, temperature)
    logprobs, entropy = logprobs_and_entropy(logits, target_ids, None, temperature)
    torch.testing.assert_close(logprobs, expected_logprobs, **EXACT)
    torch.testing.assert_close(entropy, expected_entropy, **EXACT)
    torch.testing.assert_close(
        vocab_parallel_logprobs(logits, target_ids, None, temperature), expected_logprobs, **EXACT
    )
    torch.testing.assert_close(
        vocab_parallel_entropy(logits, None, temperature), expected_entropy, **EXACT
    )


@pytest.mark.parametrize("outputs", ["logprobs", "entropy", "both"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradients_match_log_softmax(outputs: str, temperature: float) -> None:
    logits, target_ids, logprob_weights, entropy_weights = _random_inputs(1)
    logits.requires_grad_(True)
    expected_logprobs, expected_entropy = _reference(logits, target_ids, temperature)
    if outputs == "logprobs":
        loss = vocab_parallel_logprobs(logits, target_ids, None, temperature) * logprob_weights
        expected_loss = expected_logprobs * logprob_weights
    elif outputs == "entropy":
        loss = vocab_parallel_entropy(logits, None, temperature) * entropy_weights
        expected_loss = expected_entropy * entropy_weights
    else:
        logprobs, entropy = logprobs_and_entropy(logits, target_ids, None, temperature)
        loss = logprobs * logprob_weights + entropy * entropy_weights
        expected_loss = expected_logprobs * logprob_weights + expected_entropy * entropy_weights
    torch.testing.assert_close(
        _gradient(loss.sum(), logits), _gradient(expected_loss.sum(), logits), **EXACT
    )


def test_padded_vocab_ids_are_masked() -> None:
    valid_vocab_size = 33
    logits, target_ids, logprob_weights, entropy_weights = _random_inputs(2)
    target_ids = target_ids % valid_vocab_size
    logits[..., valid_vocab_size:] = 50.0  # would dominate the softmax if not masked
    logits.requires_grad_(True)
    logprobs, entropy = logprobs_and_entropy(
        logits, target_ids, None, valid_vocab_size=valid_vocab_size
    )
    expected_logprobs, expected_entropy = _reference(logits[..., :valid_vocab_size], target_ids)
    torch.testing.assert_close(logprobs, expected_logprobs, **EXACT)
    torch.testing.assert_close(entropy, expected_entropy, **EXACT)

    gradient = _gradient((logprobs * logprob_weights + entropy * entropy_weights).sum(), logits)
    expected = _gradient(
        (expected_logprobs * logprob_weights + expected_entropy * entropy_weights).sum(), logits
    )
    torch.testing.assert_close(gradient, expected, **EXACT)
    assert torch.all(gradient[..., valid_vocab_size:] == 0)


def test_bf16_logits_give_fp32_results() -> None:
    logits, target_ids, logprob_weights, _ = _random_inputs(3)
    logits_bf16 = logits.bfloat16().requires_grad_(True)
    logprobs, entropy = logprobs_and_entropy(logits_bf16, target_ids, None, temperature=0.8)
    assert logprobs.dtype == torch.float32 and entropy.dtype == torch.float32
    expected_logprobs, expected_entropy = _reference(logits_bf16.detach(), target_ids, 0.8)
    torch.testing.assert_close(logprobs, expected_logprobs, **EXACT)
    torch.testing.assert_close(entropy, expected_entropy, **EXACT)

    gradient = _gradient((logprobs * logprob_weights).sum(), logits_bf16)
    assert gradient.dtype == torch.bfloat16
    logits_fp32 = logits_bf16.detach().float().requires_grad_(True)
    expected_loss = _reference(logits_fp32, target_ids, 0.8)[0] * logprob_weights
    expected = _gradient(expected_loss.sum(), logits_fp32)
    torch.testing.assert_close(gradient, expected.bfloat16(), **BF16_ULP)


def test_extreme_logits_stay_finite() -> None:
    logits, target_ids, _, _ = _random_inputs(4)
    logits = logits * 1e4  # exp would overflow without the max shift
    logprobs, entropy = logprobs_and_entropy(logits, target_ids, None)
    expected_logprobs, expected_entropy = _reference(logits, target_ids)
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    torch.testing.assert_close(logprobs, expected_logprobs, **EXACT)
    torch.testing.assert_close(entropy, expected_entropy, **EXACT)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"valid_vocab_size": VOCAB + 1}, "valid_vocab_size"),
        ({"target_ids": torch.zeros(BATCH, SEQ + 1, dtype=torch.long)}, "shape"),
        ({"target_ids": torch.zeros(BATCH, SEQ, dtype=torch.int32)}, "int64"),
    ],
)
def test_bad_arguments_raise(change: dict, message: str) -> None:
    logits, target_ids, _, _ = _random_inputs(5)
    arguments = {"target_ids": target_ids, "temperature": 1.0, "valid_vocab_size": None} | change
    with pytest.raises(ValueError, match=message):
        vocab_parallel_logprobs(logits, tp_group=None, **arguments)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_bitwise_the_same_with_or_without_entropy(dtype: torch.dtype) -> None:
    """The actor's log-probs (taken with the entropy) equal the reference's (taken without)."""
    logits, target_ids, _, _ = _random_inputs(5)
    options = {"temperature": 0.7, "valid_vocab_size": VOCAB - 3}
    with_entropy, _ = logprobs_and_entropy(logits.to(dtype), target_ids, None, **options)
    alone = vocab_parallel_logprobs(logits.to(dtype), target_ids, None, **options)
    assert torch.equal(with_entropy, alone)
