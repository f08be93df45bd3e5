"""Rollout configuration choices that need no engine: weight-transfer backend resolution, and the
sampling settings (a light value type, importable without torch or vLLM)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rlhf.config.rollout import RolloutConfig
from megatron_rlhf.rollout.engine import resolve_transfer_backend


def test_auto_picks_shared_memory_on_a_cpu_host_shared_with_the_trainer():
    assert resolve_transfer_backend("auto", on_gpu=False) == "shm"
    assert resolve_transfer_backend("auto", on_gpu=False, same_host=True) == "shm"


def test_auto_keeps_gloo_across_cpu_hosts():
    assert resolve_transfer_backend("auto", on_gpu=False, same_host=False) == "gloo"


def test_auto_picks_vllms_cuda_ipc_colocated_and_nccl_disaggregated_on_gpu():
    assert resolve_transfer_backend("auto", on_gpu=True, same_host=True) == "ipc"
    assert resolve_transfer_backend("auto", on_gpu=True, same_host=False) == "nccl"
    assert resolve_transfer_backend("nccl", on_gpu=True) == "nccl"
    assert resolve_transfer_backend("ipc", on_gpu=True) == "ipc"


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


def test_engine_dtype_is_named_when_unknown():
    with pytest.raises(ValueError, match="dtype='auto' \\(choose float32, bfloat16, float16\\)"):
        RolloutConfig(model_dir="unused", dtype="auto")


def test_sampling_settings_live_in_a_light_module():
    probe = ("import sys\nfrom megatron_rlhf.config.sampling import SamplingSettings\nSamplingSettings(n=2)\n"
             "print('LOADED=' + ','.join(m for m in ('torch', 'vllm', 'ray') if m in sys.modules))\n")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert "LOADED=\n" in result.stdout, result.stderr


def test_bad_sampling_settings_are_named():
    from megatron_rlhf.config.sampling import SamplingSettings

    with pytest.raises(ValueError, match="top_p=0"):
        SamplingSettings(top_p=0)
