"""Sequence parallelism on the local layer spec (CPU, gloo), and the MoE training step at TP2xEP2.

Megatron-Core trains MoE with TP > 1 only under sequence parallelism, and its local spec's torch
norms refuse SP; :mod:`megatron_rlhf.models.local_norm` supplies norms that run on sequence
shards (their weight gradients summed over TP by Megatron's ``finalize_model_grads``). Checked
here, each layout loading the same HF checkpoint and running two optimizer steps (Megatron's
schedule, DDP, distributed Adam with clipping, adam_eps=1e-3 for the reason given in
test_train_step_layouts.py) on the same global batch, then exporting the weights in HF naming:

- dense (qwen3: q/k norms and tied embeddings; glm4: sandwich norms), TP2xPP2 with SP equals
  TP2xPP2 without SP within 1e-5: each step's loss and gradient norm, every updated tensor; a
  sequence length that TP does not divide is padded (also for the activations the 1F1B schedule
  sends between stages) and gives the same loss as without SP;
- MoE (qwen3_moe, 4 experts, top-2), TP2xEP2 with SP (4 ranks, DP2) equals one rank within 1e-5:
  losses, gradient norms, every gathered tensor (expert weights among them); the weight-sync
  export (``only_rank0``) of the trained model materialises the full tensors on rank 0 only.

SP does not change weight layouts: the SP exports are compared name by name with the exports
of the layouts without SP (and of one rank).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-5
DENSE_ARCHS = ("qwen3", "glm4")
LAYOUTS = {
    "dense-TP2PP2": (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 1),
    "dense-TP2PP2-SP": (ParallelConfig(tensor_parallel=2, pipeline_parallel=2, sequence_parallel=True), 1),
    "moe-EP1": (ParallelConfig(), 1),
    "moe-TP2xEP2-SP": (ParallelConfig(tensor_parallel=2, expert_parallel=2, sequence_parallel=True), 2),
}


def _loss(logits: torch.Tensor, microbatch: dict[str, torch.Tensor]):
    from megatron_rlhf.training.lm_loss import next_token_loss

    return next_token_loss(logits, microbatch, VOCAB)


def _worker(layout: str, models: dict[str, str], tokens: torch.Tensor, microbatch_size: int) -> dict:
    """One rank: per model, two training steps, the full export and the rank-0 export."""
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import export_hf_weights, load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.training.megatron_step import MegatronUpdater, OptimizerSettings

    parallel = LAYOUTS[layout][0]
    reports = {}
    for name, hf_dir in models.items():
        state = initialize_parallel(parallel, seed=1)
        arch = arch_spec_from_hf_dir(hf_dir)
        build = ModelBuildConfig(transformer_impl="local")
        model = build_stage_model(arch, parallel, build)
        load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", validate_layout(arch, parallel, build))
        updater = MegatronUpdater(model, OptimizerSettings(lr=1e-3, adam_eps=1e-3, clip_grad=1.0))
        local = tokens.chunk(state.data_parallel_size)[state.data_parallel_rank]
        microbatches = [{"input_ids": part} for part in local.split(microbatch_size)]
        steps = [updater.step(microbatches, _loss) for _ in range(2)]
        # a length TP does not divide (the trained weights stay: forward and loss only)
        odd = [{"input_ids": part[:, :-1]} for part in local.split(microbatch_size)]
        odd_loss = _eval_loss(model, odd)
        weights = {key: tensor.clone() for key, tensor in export_hf_weights(model, arch, "lm")}
        rank0 = list(export_hf_weights(model, arch, "lm", only_rank0=True))
        norm_marked = sorted(key for key, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
        reports[name] = {
            "losses": [step.loss for step in steps] if steps[0].loss is not None else None,
            "grad_norms": [step.grad_norm for step in steps],
            "odd_loss": odd_loss,
            "dp_rank": state.data_parallel_rank,
            "weights": weights if state.rank == 0 else None,
            "rank0_names_match": [key for key, _ in rank0] == list(weights),
            "rank0_materialised": [not tensor.is_meta for _, tensor in rank0],
            "rank0_equal": all(torch.equal(t, weights[k]) for k, t in rank0) if state.rank == 0 else None,
            "sp_marked": norm_marked,
        }
    return reports


def _eval_loss(model, microbatches) -> float:
    from megatron_rlhf.models.forward import forward_only

    losses = forward_only(model, microbatches, lambda output, mb: float(_loss(output, mb)[0]))
    return sum(losses) / len(losses) if losses else None  # None off the last pipeline stage


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("sp_models")
    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    return {
        arch: str(make_tiny_hf_model(arch, root / arch, seed=11, vocab_size=VOCAB, tokenizer=tokenizer,
                                     num_hidden_layers=2))
        for arch in (*DENSE_ARCHS, "qwen3_moe")
    }


@pytest.fixture(scope="module")
def results(checkpoints, rank_pool):
    tokens = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))
    cache: dict[str, dict] = {}

    def run(layout: str) -> dict:
        if layout not in cache:
            parallel, data_parallel = LAYOUTS[layout]
            names = ("qwen3_moe",) if layout.startswith("moe") else DENSE_ARCHS
            models = {name: checkpoints[name] for name in names}
            per_rank = rank_pool.run(_worker, parallel.world_size(data_parallel), layout, models, tokens,
                                     1 if layout.startswith("moe") else 2)
            cache[layout] = {name: [rank[name] for rank in per_rank] for name in names}
        return cache[layout]

    return run


def _replica_mean(ranks: list[dict], key: str) -> list[float]:
    """Mean over data-parallel replicas (TP peers report the same values)."""
    by_replica = {r["dp_rank"]: r[key] for r in ranks if r[key] is not None}  # last stages
    values = list(by_replica.values())
    if isinstance(values[0], list):
        return [sum(v[i] for v in values) / len(values) for i in range(len(values[0]))]
    return [sum(values) / len(values)]


def _assert_same_step(actual: list[dict], expected: list[dict], what: str) -> None:
    assert _replica_mean(actual, "losses") == pytest.approx(_replica_mean(expected, "losses"), abs=TOLERANCE)
    assert _replica_mean(actual, "odd_loss") == pytest.approx(_replica_mean(expected, "odd_loss"), abs=TOLERANCE)
    for rank in actual:  # the gradient norm is global: every rank reports it
        assert rank["grad_norms"] == pytest.approx(expected[0]["grad_norms"], abs=TOLERANCE), what
    got, reference = actual[0]["weights"], expected[0]["weights"]
    assert list(got) == list(reference), f"{what}: SP changed the exported names"
    for key in reference:
        assert got[key].shape == reference[key].shape, f"{what}: {key} layout changed"
    worst = max((got[key] - reference[key]).abs().max().item() for key in reference)
    assert worst <= TOLERANCE, f"{what}: max weight difference {worst:.3e}"


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_dense_step_with_sequence_parallel_equals_without(arch, results):
    _assert_same_step(results("dense-TP2PP2-SP")[arch], results("dense-TP2PP2")[arch], f"{arch} TP2PP2 SP")


def test_moe_step_at_tp2xep2_equals_one_rank(results):
    ranks = results("moe-TP2xEP2-SP")["qwen3_moe"]
    _assert_same_step(ranks, results("moe-EP1")["qwen3_moe"], "qwen3_moe TP2xEP2 SP")
    assert any(".experts." in key for key in ranks[0]["weights"])


def test_norm_weights_are_marked_for_the_tp_gradient_sum_only_under_sp(results):
    marked = results("dense-TP2PP2-SP")["glm4"][-1]["sp_marked"]  # the last stage
    assert marked and all(key.endswith("layernorm.weight") for key in marked)
    assert any("post_layernorm" in key for key in marked)  # the sandwich norms too
    assert any("final_layernorm" in key for key in marked)
    assert results("dense-TP2PP2")["glm4"][-1]["sp_marked"] == []
    moe_marked = results("moe-TP2xEP2-SP")["qwen3_moe"][0]["sp_marked"]
    assert any("router" in key for key in moe_marked)  # Megatron marks its router itself
    assert any("q_layernorm" in key for key in moe_marked)


def test_weight_sync_export_of_the_trained_moe_materialises_only_on_rank0(results):
    ranks = results("moe-TP2xEP2-SP")["qwen3_moe"]
    assert all(report["rank0_names_match"] for report in ranks)
    assert all(ranks[0]["rank0_materialised"]) and ranks[0]["rank0_equal"]
    for report in ranks[1:]:
        assert not any(report["rank0_materialised"])
