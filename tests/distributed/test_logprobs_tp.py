"""Vocab-parallel log-probs and entropy on gloo (CPU, 2 processes) against full-vocab log_softmax.

Each layout runs once (module-scoped fixture, on the shared rank pool); the workers build every case's full
``[B, T, V]`` logits from a fixed seed, keep their TP slice, and return outputs, the gradient of
their slice and the shapes of the collectives they issued. The tests then compare, in this
process, against ``torch.log_softmax`` over the full vocabulary. Layouts: TP=2 (the vocab split
over both ranks) and TP=1 x DP=2 (tensor-parallel groups of size 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor


pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
BATCH, SEQ = 3, 5
# Agreement expected of two fp32 computations of the same quantity: 1e-6 absolute plus 1e-6 of
# the magnitude (torch's own fp32 log_softmax is ~1 ulp, i.e. ~2e-6, off at log p ~ -20).
EXACT = {"atol": 1e-6, "rtol": 1e-6}
BF16_ULP = {"atol": 1e-6, "rtol": 2.0**-8}


@dataclass(frozen=True)
class Case:
    """One input configuration; the tensors are rebuilt from ``seed`` wherever they are needed."""

    name: str
    seed: int
    padded_vocab: int
    temperature: float = 1.0
    valid_vocab_size: int | None = None
    dtype: torch.dtype = torch.float32


CASES = (
    Case("fp32", seed=10, padded_vocab=48),
    Case("temperature", seed=11, padded_vocab=48, temperature=0.6),
    Case("padding", seed=12, padded_vocab=48, valid_vocab_size=41),
    # At TP=2 the second rank's slice [24, 48) is padding only.
    Case("padding_whole_slice", seed=13, padded_vocab=48, valid_vocab_size=19, temperature=1.7),
    Case("bf16", seed=14, padded_vocab=48, temperature=0.8, dtype=torch.bfloat16),
)
CASE_NAMES = [case.name for case in CASES]


def make_inputs(case: Case) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Full logits [B, T, V] (padding ids set high), targets [B, T], loss weights [B, T] x 2."""
    generator = torch.Generator().manual_seed(case.seed)
    logits = 2.0 * torch.randn(BATCH, SEQ, case.padded_vocab, generator=generator)
    valid = case.valid_vocab_size or case.padded_vocab
    logits[..., valid:] = 30.0  # would dominate the softmax if padding were not masked
    target_ids = torch.randint(0, valid, (BATCH, SEQ), generator=generator)
    logprob_weights = torch.randn(BATCH, SEQ, generator=generator)
    entropy_weights = torch.randn(BATCH, SEQ, generator=generator)
    return logits.to(case.dtype), target_ids, logprob_weights, entropy_weights


def logprobs_worker(tensor_parallel: int) -> dict[str, Any]:
    """Spawned rank: run every case on this rank's vocab slice; return results and collectives."""
    import torch.distributed as dist

    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.models.logprobs import (
        logprobs_and_entropy,
        vocab_parallel_entropy,
        vocab_parallel_logprobs,
    )
    from megatron_rlhf.parallel.init import initialize_parallel

    state = initialize_parallel(ParallelConfig(tensor_parallel=tensor_parallel), seed=1)
    tp_group = state.groups.tp
    collectives: list[tuple[str, tuple[int, ...]]] = []
    _record_collectives(dist, collectives)

    results: dict[str, Any] = {}
    for case in CASES:
        logits, target_ids, logprob_weights, entropy_weights = make_inputs(case)
        local_vocab = case.padded_vocab // tensor_parallel
        start = state.tensor_parallel_rank * local_vocab
        options = {"temperature": case.temperature, "valid_vocab_size": case.valid_vocab_size}
        gradients = {}
        outputs = {}
        for kind in ("both", "logprobs", "entropy"):
            local_logits = logits[..., start : start + local_vocab].clone().requires_grad_(True)
            if kind == "both":
                logprobs, entropy = logprobs_and_entropy(
                    local_logits, target_ids, tp_group, **options
                )
                loss = logprobs * logprob_weights + entropy * entropy_weights
                outputs.update(logprobs=logprobs.detach(), entropy=entropy.detach())
            elif kind == "logprobs":
                logprobs = vocab_parallel_logprobs(local_logits, target_ids, tp_group, **options)
                loss = logprobs * logprob_weights
                outputs["logprobs_alone"] = logprobs.detach()
            else:
                entropy = vocab_parallel_entropy(local_logits, tp_group, **options)
                loss = entropy * entropy_weights
                outputs["entropy_alone"] = entropy.detach()
            loss.sum().backward()
            gradients[kind] = local_logits.grad
        results[case.name] = {"outputs": outputs, "gradients": gradients}
    return {
        "tensor_parallel_rank": state.tensor_parallel_rank,
        "data_parallel_rank": state.data_parallel_rank,
        "collectives": collectives,
        "cases": results,
    }


def _record_collectives(dist: Any, collectives: list[tuple[str, tuple[int, ...]]]) -> None:
    """Log every all_reduce's shape; make any gather/broadcast/all-to-all fail loudly."""
    all_reduce = dist.all_reduce

    def recording_all_reduce(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        collectives.append(("all_reduce", tuple(tensor.shape)))
        return all_reduce(tensor, *args, **kwargs)

    def forbidden(name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"logprobs must not call torch.distributed.{name}")

        return fail

    dist.all_reduce = recording_all_reduce
    for name in ("all_gather", "all_gather_into_tensor", "broadcast", "all_to_all_single"):
        setattr(dist, name, forbidden(name))


@pytest.fixture(scope="module", params=[2, 1], ids=["tp2", "tp1_dp2"])
def run(request: pytest.FixtureRequest, rank_pool) -> dict[str, Any]:
    """One job per layout: the per-rank results and the full-vocab views rebuilt from them."""
    tensor_parallel = request.param
    ranks = rank_pool.run(logprobs_worker, WORLD_SIZE, tensor_parallel)
    return {"tensor_parallel": tensor_parallel, "ranks": ranks}


def _full_gradients(ranks: list[dict[str, Any]], case_name: str, kind: str) -> list[Tensor]:
    """Per TP group (one per DP rank): the slices' gradients concatenated in vocab order."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for rank in ranks:
        groups.setdefault(rank["data_parallel_rank"], []).append(rank)
    return [
        torch.cat(
            [
                member["cases"][case_name]["gradients"][kind]
                for member in sorted(members, key=lambda r: r["tensor_parallel_rank"])
            ],
            dim=-1,
        )
        for members in groups.values()
    ]


def _reference(case: Case) -> dict[str, Tensor]:
    """Full-vocab fp32 log_softmax gather, entropy and their gradients for ``case``."""
    logits, target_ids, logprob_weights, entropy_weights = make_inputs(case)
    valid = case.valid_vocab_size or case.padded_vocab
    full_logits = logits.float().requires_grad_(True)
    log_probs = torch.log_softmax(full_logits[..., :valid] / case.temperature, dim=-1)
    logprobs = log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    losses = {
        "both": logprobs * logprob_weights + entropy * entropy_weights,
        "logprobs": logprobs * logprob_weights,
        "entropy": entropy * entropy_weights,
    }
    reference = {"logprobs": logprobs.detach(), "entropy": entropy.detach()}
    for kind, loss in losses.items():
        (reference[f"grad_{kind}"],) = torch.autograd.grad(
            loss.sum(), full_logits, retain_graph=True
        )
    return reference


@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_logprobs_match_full_vocab_log_softmax(run: dict[str, Any], case: Case) -> None:
    expected = _reference(case)["logprobs"]
    for rank in run["ranks"]:
        outputs = rank["cases"][case.name]["outputs"]
        assert outputs["logprobs"].dtype == torch.float32
        torch.testing.assert_close(outputs["logprobs"], expected, **EXACT)
        torch.testing.assert_close(outputs["logprobs_alone"], expected, **EXACT)


@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_entropy_matches_full_vocab_entropy(run: dict[str, Any], case: Case) -> None:
    expected = _reference(case)["entropy"]
    for rank in run["ranks"]:
        outputs = rank["cases"][case.name]["outputs"]
        assert outputs["entropy"].dtype == torch.float32
        torch.testing.assert_close(outputs["entropy"], expected, **EXACT)
        torch.testing.assert_close(outputs["entropy_alone"], expected, **EXACT)


@pytest.mark.parametrize("kind", ["both", "logprobs", "entropy"])
@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_gradients_match_full_vocab_reference(run: dict[str, Any], case: Case, kind: str) -> None:
    expected = _reference(case)[f"grad_{kind}"]
    tolerance = BF16_ULP if case.dtype == torch.bfloat16 else EXACT
    for gradient in _full_gradients(run["ranks"], case.name, kind):
        assert gradient.dtype == case.dtype
        torch.testing.assert_close(gradient, expected.to(case.dtype), **tolerance)


@pytest.mark.parametrize("case", [c for c in CASES if c.valid_vocab_size], ids=lambda c: c.name)
def test_padded_ids_get_exactly_zero_gradient(run: dict[str, Any], case: Case) -> None:
    for kind in ("both", "logprobs", "entropy"):
        for gradient in _full_gradients(run["ranks"], case.name, kind):
            assert torch.all(gradient[..., case.valid_vocab_size :] == 0)


def test_outputs_identical_on_every_rank(run: dict[str, Any]) -> None:
    first, *others = run["ranks"]
    for rank in others:
        for case in CASES:
            for name, value in rank["cases"][case.name]["outputs"].items():
                assert torch.equal(value, first["cases"][case.name]["outputs"][name]), name


def test_only_token_sized_all_reduces(run: dict[str, Any]) -> None:
    """No gather of the vocab: at TP>1 only [B, T] / [k<=3, B, T] all-reduces, 2 per call."""
    calls_per_rank = 3 * len(CASES)  # both + logprobs alone + entropy alone
    for rank in run["ranks"]:
        collectives = rank["collectives"]
        if run["tensor_parallel"] == 1:
            assert collectives == []
            continue
        assert len(collectives) == 2 * calls_per_rank
        for name, shape in collectives:
            assert name == "all_reduce"
            assert shape == (BATCH, SEQ) or (shape[1:] == (BATCH, SEQ) and shape[0] <= 3), shape


def test_logprobs_do_not_depend_on_the_entropy_pass(run: dict[str, Any]) -> None:
    """The actor takes its log-probs with the entropy, the reference without: bitwise the same."""
    for rank in run["ranks"]:
        for case in CASES:
            outputs = rank["cases"][case.name]["outputs"]
            assert torch.equal(outputs["logprobs"], outputs["logprobs_alone"]), case.name
