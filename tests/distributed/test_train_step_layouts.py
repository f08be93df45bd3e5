"""A training step gives the same loss and updated weights under TP2, PP2, DP2, TP2xPP2 as TP1 PP1.

Each layout builds the model from the same HF checkpoint, runs two optimizer steps (forward,
backward through Megatron's schedule, DP reduction, Megatron's distributed optimizer with
gradient clipping) on
the same global batch of 4 sequences, split over data-parallel ranks and 2-sequence microbatches,
and exports the updated weights in HF naming. Checked against TP1 PP1 within 1e-5 (fp32): the
loss of each step and every updated tensor. An untied (llama) and a tied (qwen2, embedding
gradients synchronised across pipeline stages) model are both covered. A step whose batch makes
the loss NaN is skipped and counted, and changes no weight; so is a step whose loss is finite but
whose gradient holds a NaN (one logit's, spread by backward; checked over the DDP's gradient
buffers, on every rank).

Optimizer: Megatron's distributed Adam with adam_eps=1e-3. Adam divides by sqrt(v) + eps; with
the usual eps=1e-8 at lr 1e-3 this comparison was measured at up to 3e-5 in 1 element out of
~30k per tensor, because gradients that cancel to ~1e-8 carry ~1e-10 of fp32 reduction-order
noise, which Adam scales up to ~1e-5. With eps=1e-3 that amplification is bounded by
lr * noise / eps ~ 1e-10, while a wrong gradient shard (an error of the order of the gradient,
1e-3..1e-2) still moves weights by ~5e-4, far above the 1e-5 tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

ARCHS = ("llama", "qwen2")
VOCAB = 300
TOLERANCE = 1e-5
LAYOUTS = {
    "TP1PP1": (ParallelConfig(), 1),
    "TP2": (ParallelConfig(tensor_parallel=2), 1),
    "PP2": (ParallelConfig(pipeline_parallel=2), 1),
    "DP2": (ParallelConfig(), 2),
    "TP2PP2": (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 1),
}


def lm_loss(logits: torch.Tensor, microbatch: dict[str, torch.Tensor]):
    from megatron_rlhf.training.lm_loss import next_token_loss

    return next_token_loss(logits, microbatch, VOCAB)


def _train_worker(parallel: ParallelConfig, models: dict[str, str], tokens: torch.Tensor):
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import export_hf_weights, load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.training.megatron_step import MegatronUpdater, OptimizerSettings

    reports = {}
    for name, hf_dir in models.items():
        state = initialize_parallel(parallel, seed=1)
        arch = arch_spec_from_hf_dir(hf_dir)
        build = ModelBuildConfig(transformer_impl="local")
        padded = validate_layout(arch, parallel, build)
        model = build_stage_model(arch, parallel, build)
        load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", padded)
        updater = MegatronUpdater(model, OptimizerSettings(lr=1e-3, adam_eps=1e-3, clip_grad=1.0))
        local = tokens.chunk(state.data_parallel_size)[state.data_parallel_rank]
        microbatches = [{"input_ids": part} for part in local.split(2)]
        losses = [updater.step(microbatches, lm_loss).loss for _ in range(2)]
        before_nan = _snapshot(export_hf_weights(model, arch, "lm"))
        poisoned = updater.step(microbatches, lambda out, mb: _nan_loss(out, mb))
        nan_skipped = poisoned.skipped and updater.skipped_steps == 1
        after_nan = _snapshot(export_hf_weights(model, arch, "lm"))
        poisoned_grad = updater.step(microbatches, _nan_grad_loss)
        after_nan_grad = _snapshot(export_hf_weights(model, arch, "lm"))
        reports[name] = {
            "losses": losses,
            "weights": after_nan if state.rank == 0 else None,
            "nan_skipped": nan_skipped,
            "nan_changed": [k for k in before_nan if not torch.equal(before_nan[k], after_nan[k])],
            "nan_grad_skipped": (poisoned_grad.skipped and updater.skipped_steps == 2
                                 and all(math.isfinite(m["loss"]) for m in poisoned_grad.metrics if "loss" in m)),
            "nan_grad_changed": [k for k in after_nan if not torch.equal(after_nan[k], after_nan_grad[k])],
        }
    return reports


def _snapshot(weights) -> dict[str, torch.Tensor]:
    """Copies: an export may hand out views of the live parameters."""
    return {name: tensor.clone() for name, tensor in weights}


def _nan_loss(logits: torch.Tensor, microbatch: dict[str, torch.Tensor]):
    loss, _ = lm_loss(logits, microbatch)
    loss = loss * float("nan")
    return loss, {"loss": loss.detach()}


def _nan_grad_loss(logits: torch.Tensor, microbatch: dict[str, torch.Tensor]):
    """The usual loss (finite); backward puts a NaN into one logit's gradient."""

    def poison(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad

    logits.register_hook(poison)
    return lm_loss(logits, microbatch)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("train_models")
    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    return {
        arch: str(make_tiny_hf_model(arch, root / arch, seed=11, vocab_size=VOCAB, tokenizer=tokenizer))
        for arch in ARCHS
    }


@pytest.fixture(scope="module")
def results(hf_models, rank_pool):
    tokens = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    cache: dict[str, dict] = {}

    def run(layout: str) -> dict:
        if layout not in cache:
            parallel, data_parallel = LAYOUTS[layout]
            per_rank = rank_pool.run(_train_worker, parallel.world_size(data_parallel), parallel, hf_models, tokens)
            merged = {}
            for arch in ARCHS:
                reported = [r[arch]["losses"] for r in per_rank if r[arch]["losses"][0] is not None]
                # Average over data-parallel replicas (TP ranks report identical values).
                step_losses = [sum(l[i] for l in reported) / len(reported) for i in range(2)]
                merged[arch] = {
                    "losses": step_losses,
                    "weights": per_rank[0][arch]["weights"],
                    "nan_skipped": all(r[arch]["nan_skipped"] for r in per_rank),
                    "nan_changed": per_rank[0][arch]["nan_changed"],
                    "nan_grad_skipped": all(r[arch]["nan_grad_skipped"] for r in per_rank),
                    "nan_grad_changed": per_rank[0][arch]["nan_grad_changed"],
                }
            cache[layout] = merged
        return cache[layout]

    return run


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "TP1PP1"])
@pytest.mark.parametrize("arch", ARCHS)
def test_losses_match_tp1pp1(arch, layout, results):
    expected = results("TP1PP1")[arch]["losses"]
    actual = results(layout)[arch]["losses"]
    assert actual == pytest.approx(expected, abs=TOLERANCE), f"{arch} {layout}: {actual} vs {expected}"


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "TP1PP1"])
@pytest.mark.parametrize("arch", ARCHS)
def test_updated_weights_match_tp1pp1(arch, layout, results):
    expected = results("TP1PP1")[arch]["weights"]
    actual = results(layout)[arch]["weights"]
    assert sorted(actual) == sorted(expected)
    worst = max((actual[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= TOLERANCE, f"{arch} {layout}: max weight difference {worst:.3e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_actually_moved(arch, hf_models, results):
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader

    reader = HFWeightReader(hf_models[arch])
    updated = results("TP1PP1")[arch]["weights"]
    moved = [k for k in updated if not torch.equal(updated[k], reader.get(k))]
    assert len(moved) == len(updated), "every tensor should change after two Adam steps"


@pytest.mark.parametrize("layout", ["TP1PP1", "DP2", "TP2PP2"])
def test_non_finite_loss_skips_the_step(layout, results):
    for arch in ARCHS:
        report = results(layout)[arch]
        assert report["nan_skipped"], f"{arch} {layout}: NaN step not reported as skipped"
        assert report["nan_changed"] == [], f"{arch} {layout}: NaN step changed weights"
        assert report["nan_grad_skipped"], f"{arch} {layout}: a finite loss with a NaN gradient was not skipped"
        assert report["nan_grad_changed"] == [], f"{arch} {layout}: the NaN-gradient step changed weights"
