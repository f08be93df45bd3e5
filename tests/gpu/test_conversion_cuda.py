"""On CUDA: HF -> Megatron on NCCL (TP over the visible GPUs, up to 2) matches transformers.

Runs the local layer spec and, when Transformer Engine is installed, the TE spec (fused layer
norms, TE linear layers), so the TE parameter-name translation of ``megatron_rlhf.mapping`` is
exercised for real. Skipped wherever CUDA is absent (CI).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.parallel.launch import spawn

pytestmark = pytest.mark.gpu
TOLERANCE = 1e-4


def _cuda_worker(hf_dir: str, impl: str, tokens: torch.Tensor):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import export_hf_weights, load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.forward import forward_only, gather_vocab_parallel_logits
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel

    parallel = ParallelConfig(tensor_parallel=min(2, torch.cuda.device_count()))
    state = initialize_parallel(parallel, seed=1)
    assert state.backend == "nccl"
    arch = arch_spec_from_hf_dir(hf_dir)
    build = ModelBuildConfig(transformer_impl=impl)
    model = build_stage_model(arch, parallel, build)
    reader = HFWeightReader(hf_dir)
    load_hf_weights(model, reader, arch, "lm", validate_layout(arch, parallel, build), impl=impl)
    outputs = forward_only(
        model,
        [{"input_ids": tokens.to(state.device)}],
        lambda logits, _: gather_vocab_parallel_logits(logits.float(), arch.vocab_size).cpu(),
    )
    exported = {k: v.cpu() for k, v in export_hf_weights(model, arch, "lm", impl=impl)}
    same = all(torch.equal(exported[name], reader.get(name)) for name in reader.names())
    return outputs[0] if outputs else None, same


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_cuda_conversion_matches_transformers(impl, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine")
    from transformers import AutoModelForCausalLM

    from megatron_rlhf.models.tiny import make_tiny_hf_model

    hf_dir = str(make_tiny_hf_model("qwen3", tmp_path / "qwen3", seed=3, vocab_size=500))
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    world = min(2, torch.cuda.device_count())
    results = spawn(_cuda_worker, world, hf_dir, impl, tokens)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        expected = reference(input_ids=tokens.cuda()).logits.float().cpu()
    logits, same = results[0]
    assert same, "round trip through the CUDA model changed a tensor"
    assert (logits - expected).abs().max().item() <= TOLERANCE
