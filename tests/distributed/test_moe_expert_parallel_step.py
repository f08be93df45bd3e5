"""Training steps of the MoE family (tiny qwen3_moe, 4 experts, top-2) under expert parallelism,
and of uneven pipeline stages, give the same losses and weights as one rank.

Each layout loads the same HF checkpoint, runs two optimizer steps (Megatron's schedule, the
alltoall token dispatcher, DP/EP gradient reduction, distributed Adam with clipping) on the same
global batch of 4 full sequences, split over data-parallel ranks (expert parallelism is carved
out of them) in microbatches of 1, and exports the updated weights in HF naming. Checked against
EP1 (one rank) within 1e-5 (fp32): every step's loss and every gathered tensor, at EP2 and PP2
with uneven stages (1 layer on the first stage, 3 on the last). TP2xEP2: Megatron-Core refuses
to train MoE with TP > 1 without sequence parallelism; that step (with SP) is checked on CPU in
tests/distributed/test_moe_tp_ep.py and with Transformer Engine in
tests/gpu/test_sequence_context_parallel_cuda.py (with this worker); here TP2xEP2 without SP
checks the export only. The weight-sync export
(``only_rank0``) of the updated model is also checked at EP2 and TP2xEP2: the full tensors on
rank 0 only (expert tensors from the expert-parallel ranks that own them), equal to the
everywhere export, ``meta`` stand-ins elsewhere.

Adam's eps is 1e-3 for the reason given in test_train_step_layouts.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-5
LAYOUTS = {
    "EP1": (ParallelConfig(), 1),
    "EP2": (ParallelConfig(expert_parallel=2), 2),
    "TP2xEP2": (ParallelConfig(tensor_parallel=2, expert_parallel=2), 2),
    "PP2-uneven": (ParallelConfig(pipeline_parallel=2, num_layers_in_first_pipeline_stage=1), 1),
    # Megatron-Core trains MoE with TP > 1 only under sequence parallelism: this one runs with
    # TE in tests/gpu/test_sequence_context_parallel_cuda.py (on CPU: tests/distributed/test_moe_tp_ep.py)
    "TP2xEP2-SP": (ParallelConfig(tensor_parallel=2, expert_parallel=2, sequence_parallel=True), 2),
}
TRAINS_ON_CPU = ("EP1", "EP2", "PP2-uneven")


def _loss(logits: torch.Tensor, microbatch: dict[str, torch.Tensor]):
    from megatron_rlhf.training.lm_loss import next_token_loss

    return next_token_loss(logits, microbatch, VOCAB)


def _worker(layout: str, hf_dir: str, tokens: torch.Tensor, impl: str = "local") -> dict:
    """One rank: two training steps (where the layout trains on this machine), then both exports."""
    from megatron.core import parallel_state

    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import export_hf_weights, load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.training.megatron_step import MegatronUpdater, OptimizerSettings

    parallel = LAYOUTS[layout][0]
    state = initialize_parallel(parallel, seed=1)
    arch = arch_spec_from_hf_dir(hf_dir)
    build = ModelBuildConfig(transformer_impl=impl)
    model = build_stage_model(arch, parallel, build, device=state.device)
    load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", validate_layout(arch, parallel, build), impl=impl)
    layers = len(model.module.decoder.layers)
    losses = None
    if layout in TRAINS_ON_CPU or impl == "transformer_engine":
        updater = MegatronUpdater(model, OptimizerSettings(lr=1e-3, adam_eps=1e-3, clip_grad=1.0))
        local = tokens.chunk(state.data_parallel_size)[state.data_parallel_rank].to(state.device)
        microbatches = [{"input_ids": part} for part in local.split(1)]
        losses = [updater.step(microbatches, _loss).loss for _ in range(2)]
    weights = {name: tensor.cpu().clone() for name, tensor in export_hf_weights(model, arch, "lm", impl=impl)}
    rank0 = [(name, tensor.cpu().clone() if not tensor.is_meta else tensor)
             for name, tensor in export_hf_weights(model, arch, "lm", impl=impl, only_rank0=True)]
    is_rank0 = state.rank == 0
    return {
        "losses": losses if parallel_state.is_pipeline_last_stage() else None,
        "trained": losses is not None,
        "dp_rank": state.data_parallel_rank,
        "stage_layers": layers,
        "weights": weights if is_rank0 else None,
        "rank0_names_match": [name for name, _ in rank0] == list(weights),
        "rank0_materialised": [not tensor.is_meta for _, tensor in rank0],
        "rank0_equal": all(torch.equal(tensor, weights[name]) for name, tensor in rank0) if is_rank0 else None,
    }


def moe_checkpoint(root) -> tuple[str, torch.Tensor]:
    """The tiny qwen3_moe HF directory and the global batch of 4 token sequences."""
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    hf_dir = str(make_tiny_hf_model("qwen3_moe", root / "qwen3_moe", seed=11, vocab_size=VOCAB,
                                    tokenizer=train_tiny_tokenizer(VOCAB, seed=0)))
    return hf_dir, torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def results(tmp_path_factory, rank_pool):
    hf_dir, tokens = moe_checkpoint(tmp_path_factory.mktemp("moe_step"))
    cache: dict[str, list[dict]] = {}

    def run(layout: str) -> list[dict]:
        if layout not in cache:
            parallel, dp = LAYOUTS[layout]
            cache[layout] = rank_pool.run(_worker, parallel.world_size(dp), layout, hf_dir, tokens)
        return cache[layout]

    return run


def step_losses(ranks: list[dict]) -> list[float]:
    """Mean over data-parallel replicas of each step's loss (TP peers report the same values)."""
    by_replica = {r["dp_rank"]: r["losses"] for r in ranks if r["losses"] is not None}
    return [sum(losses[i] for losses in by_replica.values()) / len(by_replica) for i in range(2)]


@pytest.mark.parametrize("layout", ["EP2", "PP2-uneven"])
def test_step_matches_one_rank(layout, results):
    expected, ranks = results("EP1"), results(layout)
    assert all(report["trained"] for report in ranks)
    assert step_losses(ranks) == pytest.approx(step_losses(expected), abs=TOLERANCE)
    actual, reference = ranks[0]["weights"], expected[0]["weights"]
    assert sorted(actual) == sorted(reference)
    worst = max((actual[name] - reference[name]).abs().max().item() for name in reference)
    assert worst <= TOLERANCE, f"{layout}: max weight difference {worst:.3e}"
    assert any(".experts." in name for name in reference)  # expert weights are among them


def test_uneven_pipeline_stages_hold_1_and_3_layers(results):
    assert [report["stage_layers"] for report in results("PP2-uneven")] == [1, 3]


@pytest.mark.parametrize("layout", ["EP2", "TP2xEP2"])
def test_weight_sync_export_materialises_only_on_rank0(layout, results):
    """TP2xEP2 exports the loaded weights (its training step needs sequence parallelism, see
    tests/distributed/test_moe_tp_ep.py)."""
    ranks = results(layout)
    assert all(report["rank0_names_match"] for report in ranks)
    assert all(ranks[0]["rank0_materialised"]) and ranks[0]["rank0_equal"]
    for report in ranks[1:]:
        assert not any(report["rank0_materialised"])
