"""Rollout configuration choices that need no engine: weight-transfer backend resolution."""

from __future__ import annotations

import pytest

from megatron_rlhf.rollout.engine import RolloutConfig, resolve_transfer_backend


def test_auto_picks_shared_memory_on_a_cpu_host_shared_with_the_trainer():
    assert resolve_transfer_backend("auto", on_gpu=False) == "shm"
    assert resolve_transfer_backend("auto", on_gpu=False, same_host=True) == "shm"


@pytest.mark.parametrize("on_gpu,same_host", [(False, False), (True, True), (True, False)])
def test_auto_keeps_gloo_across_hosts_and_on_gpu(on_gpu, same_host):
    assert resolve_transfer_backend("auto", on_gpu, same_host=same_host) == "gloo"


@pytest.mark.parametrize("on_gpu", [False, True])
def test_explicit_transports_and_none_pass_through(on_gpu):
    assert resolve_transfer_backend(None, on_gpu) is None
    assert resolve_transfer_backend("gloo", on_gpu) == "gloo"
    assert resolve_transfer_backend("gloo", on_gpu, same_host=False) == "gloo"
    assert resolve_transfer_backend("shm", on_gpu) == "shm"


def test_shm_across_hosts_is_refused_with_the_alternative():
    with pytest.raises(ValueError, match="weight_transfer_backend='shm' needs the trainer on the engine's host; use 'gloo'"):
        resolve_transfer_backend("shm", on_gpu=False, same_host=False)


@pytest.mark.parametrize("backend", ["nccl", "ipc"])
def test_gpu_transports_are_refused_on_cpu_with_the_alternative(backend):
    with pytest.raises(ValueError, match=f"weight_transfer_backend='{backend}' needs GPUs; use 'shm' .* or 'gloo'"):
        resolve_transfer_backend(backend, on_gpu=False)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="weight_transfer_backend='rdma'"):
        resolve_transfer_backend("rdma", on_gpu=True)


def test_bad_overlong_policy_is_named():
    with pytest.raises(ValueError, match="overlong_prompts='cut'"):
        RolloutConfig(model_dir="x", overlong_prompts="cut")
