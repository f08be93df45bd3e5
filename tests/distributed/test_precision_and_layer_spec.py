"""bf16 mixed precision trains on CPU (gloo), and one layer-spec choice serves build, load, export.

bf16: Megatron's mixed-precision path runs on CPU as it does on GPU: the model (norms included,
as Megatron's Float16Module casts them) holds bfloat16 weights and computes in bfloat16, the
distributed optimizer keeps fp32 main weights, gradients are reduced into fp32 main grads, and
Adam's state is fp32. Four steps at DP2 track the fp32 run's losses within bf16's precision
(2e-2) and lower the loss. fp8 needs Transformer Engine and a GPU (tests/gpu).

Layer spec: ``transformer_impl="auto"`` is resolved once by the provider and carried by the model
(``RoleModel.transformer_impl``); loading and exporting read the parameter names through that
same choice (also through the DDP wrapper), a different explicit choice is refused, and the HF
round trip through it is exact.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.config.precision import PrecisionConfig

pytestmark = pytest.mark.distributed
VOCAB = 300


def _lm_loss(logits: torch.Tensor, microbatch: dict[str, torch.Tensor]):
    from megatron_rlhf.training.lm_loss import next_token_loss

    return next_token_loss(logits, microbatch, VOCAB)


def _worker(hf_dir: str, tokens: torch.Tensor) -> dict:
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import (
        WeightMappingError,
        export_hf_weights,
        load_hf_weights,
        model_transformer_impl,
    )
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.training.megatron_step import MegatronUpdater, OptimizerSettings

    parallel = ParallelConfig()
    report: dict = {}
    for mode in ("fp32", "bf16"):
        state = initialize_parallel(parallel, seed=1)
        arch = arch_spec_from_hf_dir(hf_dir)
        build = ModelBuildConfig(transformer_impl="auto", precision=PrecisionConfig(mode=mode))
        padded = validate_layout(arch, parallel, build)
        model = build_stage_model(arch, parallel, build)
        load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", padded)
        exported = dict(export_hf_weights(model, arch, "lm"))
        reader = HFWeightReader(hf_dir)
        dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        round_trip = all(torch.equal(exported[name], reader.get(name).to(dtype)) for name in exported)
        updater = MegatronUpdater(model, OptimizerSettings(lr=1e-3, adam_eps=1e-3))
        try:
            load_hf_weights(model, reader, arch, "lm", padded, impl="transformer_engine")
            refused = False
        except WeightMappingError:
            refused = True
        local = tokens.chunk(state.data_parallel_size)[state.data_parallel_rank]
        microbatches = [{"input_ids": part} for part in local.split(2)]
        losses = [float(updater.step(microbatches, _lm_loss).loss) for _ in range(4)]
        optimizer = updater.optimizer.chained_optimizers[0]
        main_params = {p.dtype for group in getattr(optimizer, "shard_fp32_from_float16_groups", []) for p in group}
        adam_state = {v.dtype for s in optimizer.optimizer.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor) and v.dim() > 0}
        report[mode] = {
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "compute_dtype": str(model.config.params_dtype), "bf16": model.config.bf16,
            "main_param_dtypes": sorted(str(d) for d in main_params),
            "main_grad_dtypes": sorted({str(p.main_grad.dtype) for p in model.parameters()}),
            "adam_state_dtypes": sorted(str(d) for d in adam_state),
            "impl": model.transformer_impl, "impl_through_ddp": model_transformer_impl(updater.model),
            "round_trip": round_trip, "other_impl_refused": refused, "losses": losses,
        }
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory, rank_pool):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("precision")
    hf_dir = make_tiny_hf_model("llama", root / "llama", seed=11, vocab_size=VOCAB,
                                tokenizer=train_tiny_tokenizer(VOCAB, seed=0))
    tokens = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    return rank_pool.run(_worker, 2, str(hf_dir), tokens)  # DP2: gradients reduced over gloo


def test_bf16_trains_with_fp32_main_weights_grads_and_adam_state(reports):
    for rank in reports:
        bf16 = rank["bf16"]
        assert bf16["param_dtypes"] == ["torch.bfloat16"] and bf16["bf16"]
        assert bf16["compute_dtype"] == "torch.bfloat16"
        assert bf16["main_param_dtypes"] == ["torch.float32"]
        assert bf16["main_grad_dtypes"] == ["torch.float32"]
        assert bf16["adam_state_dtypes"] == ["torch.float32"]
        assert rank["fp32"]["param_dtypes"] == ["torch.float32"] and not rank["fp32"]["bf16"]


def test_bf16_losses_track_fp32_and_fall(reports):
    fp32, bf16 = reports[0]["fp32"]["losses"], reports[0]["bf16"]["losses"]
    assert bf16 == pytest.approx(fp32, abs=2e-2)
    assert bf16[-1] < bf16[0] - 0.3


def test_build_load_and_export_use_one_layer_spec_choice(reports):
    for rank in reports:
        for mode in ("fp32", "bf16"):
            report = rank[mode]
            assert report["impl"] == "local"  # auto resolves to local without TE and CUDA
            assert report["impl_through_ddp"] == report["impl"]
            assert report["round_trip"], f"{mode}: HF -> Megatron -> HF changed a tensor"
            assert report["other_impl_refused"]
