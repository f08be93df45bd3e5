"""Rollout configuration choices that need no engine: weight-transfer backend resolution."""

from __future__ import annotations

import pytest

from megatron_rlhf.rollout.engine import RolloutConfig, resolve_transfer_backend


@pytest.mark.parametrize("on_gpu", [False, True])
def test_auto_picks_the_transport_weight_sync_implements(on_gpu):
    assert resolve_transfer_backend("auto", on_gpu) == "gloo"
    assert resolve_transfer_backend(None, on_gpu) is None


@pytest.mark.parametrize("backend", ["nccl", "ipc"])
def test_gpu_transports_are_refused_on_cpu_with_the_alternative(backend):
    with pytest.raises(ValueError, match=f"weight_transfer_backend='{backend}' needs GPUs; use 'gloo'"):
        resolve_transfer_backend(backend, on_gpu=False)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="weight_transfer_backend='rdma'"):
        resolve_transfer_backend("rdma", on_gpu=True)


def test_bad_overlong_policy_is_named():
    with pytest.raises(ValueError, match="overlong_prompts='cut'"):
        RolloutConfig(model_dir="x", overlong_prompts="cut")
