"""Where a vLLM engine runs (``RolloutConfig.engine_process``) and the eager token-rank count of
CPU engines: choices and arithmetic that need no engine (the in-process engine itself:
``tests/integration/test_engine_in_process.py``)."""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.errors import UserError
from megatron_rlhf.config.rollout import RolloutConfig
from megatron_rlhf.rollout.engine_in_process import (
    EngineProcessUnavailable,
    in_process_obstacle,
    resolve_engine_process,
)
from megatron_rlhf.rollout.sampler_rank import count_at_least


@pytest.mark.parametrize("world", [None, 1])
def test_auto_runs_a_one_worker_cpu_engine_in_this_process(world):
    assert resolve_engine_process("auto", on_gpu=False, tensor_parallel=1, process_world_size=world) == "in_process"
    assert resolve_engine_process("in_process", False, 1, world) == "in_process"
    assert resolve_engine_process("separate", False, 1, world) == "separate"


@pytest.mark.parametrize("on_gpu,tensor_parallel,world,reason", [
    (True, 1, None, "GPU engines"),
    (False, 2, None, "tensor_parallel=2"),
    (False, 1, 4, "one of 4 torch.distributed ranks"),
])
def test_auto_falls_back_to_separate_processes_and_in_process_is_refused_with_the_reason(
        on_gpu, tensor_parallel, world, reason):
    assert reason in in_process_obstacle(on_gpu, tensor_parallel, world)
    assert resolve_engine_process("auto", on_gpu, tensor_parallel, world) == "separate"
    assert resolve_engine_process("separate", on_gpu, tensor_parallel, world) == "separate"
    with pytest.raises(EngineProcessUnavailable, match="engine_process=in_process: .*" + reason) as raised:
        resolve_engine_process("in_process", on_gpu, tensor_parallel, world)
    assert isinstance(raised.value, UserError)


def test_an_unknown_engine_process_is_refused_by_the_config():
    with pytest.raises(ValueError, match="engine_process='threads'"):
        RolloutConfig(model_dir="m", engine_process="threads")


def test_eager_token_ranks_count_the_entries_at_least_as_likely():
    """The rank vLLM reports for a sampled token: entries of its row >= its log-prob (ties
    included, so the token counts itself). Checked against a per-row loop on random rows with ties."""
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.randint(-20, 0, (37, 500), generator=generator).float() / 4
    sampled = torch.randint(0, 500, (37,), generator=generator)
    values = logprobs.gather(-1, sampled.unsqueeze(-1))
    expected = torch.tensor([sum(1 for entry in row.tolist() if entry >= value)
                             for row, value in zip(logprobs, values.squeeze(-1).tolist())])
    ranks = count_at_least(logprobs, values)
    assert ranks.dtype == torch.int64 and torch.equal(ranks, expected)
    assert bool((ranks >= 1).all())


def test_a_disaggregated_in_process_engine_computes_on_its_bound_cores():
    """The rollout worker's process holds only its engine: with a core list it runs there, one torch
    thread per core; with auto, or an engine in vLLM's own processes, it is left alone."""
    import subprocess
    import sys

    script = (
        "import os, torch\n"
        "from megatron_rlhf.config.rollout import RolloutConfig\n"
        "from megatron_rlhf.workers.rollout_worker import compute_on_bound_cores\n"
        "before = (sorted(os.sched_getaffinity(0)), torch.get_num_threads())\n"
        "compute_on_bound_cores(RolloutConfig(model_dir='m', cpu_threads_bind='0', engine_process='separate'))\n"
        "compute_on_bound_cores(RolloutConfig(model_dir='m'))\n"
        "unchanged = (sorted(os.sched_getaffinity(0)), torch.get_num_threads()) == before\n"
        "compute_on_bound_cores(RolloutConfig(model_dir='m', cpu_threads_bind='0'))\n"
        "print(unchanged, sorted(os.sched_getaffinity(0)), torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "[0]", "1"]


def test_the_rl_config_refuses_an_in_process_engine_where_it_cannot_run_before_anything_starts():
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.trainer.rl_config import RLConfig, WorkerGroupConfig

    def config(**overrides):
        return RLConfig(policy_dir="p", out_dir="o", prompt_files=("x.jsonl",), **overrides)

    assert config().engine_process == "auto"
    assert config(engine_process="in_process").engine_process == "in_process"
    with pytest.raises(ValueError, match="engine_process='fork'"):
        config(engine_process="fork")
    two_ranks = WorkerGroupConfig(world_size=2, parallel=ParallelConfig(tensor_parallel=2))
    with pytest.raises(ValueError, match="in_process.*one of 2 torch.distributed ranks"):
        config(engine_process="in_process", actor=two_ranks)
    assert config(engine_process="auto", actor=two_ranks).engine_process == "auto"  # separate, at start-up
    with pytest.raises(ValueError, match="in_process.*tensor_parallel=2"):
        config(engine_process="in_process", placement="disaggregated", rollout_engines=(1, 2))


def test_a_host_of_several_numa_nodes_keeps_vllms_own_processes(tmp_path):
    """vLLM's CPU worker binds its whole process's memory to one NUMA node: in the trainer's
    process that would bind the trainer's memory too."""
    from megatron_rlhf.rollout.engine_in_process import host_numa_nodes

    for name in ("node0", "node1", "possible", "has_cpu"):
        (tmp_path / name).mkdir()
    assert host_numa_nodes(str(tmp_path)) == 2
    assert host_numa_nodes(str(tmp_path / "absent")) == 1
    assert resolve_engine_process("auto", False, 1, None, numa_nodes=2) == "separate"
    with pytest.raises(EngineProcessUnavailable, match="2 NUMA nodes"):
        resolve_engine_process("in_process", False, 1, None, numa_nodes=2)
    assert resolve_engine_process("auto", False, 1, None, numa_nodes=1) == "in_process"


def test_a_disaggregated_engine_takes_nccl_on_gpus_and_shm_only_on_the_trainers_cpu_host(monkeypatch):
    """An engine of its own on a GPU has its own GPU: NCCL even on a one-node cluster (CUDA IPC
    would need the trainer's GPU). A CPU engine takes shm on a one-node cluster, else gloo (the
    one-node case with a real Ray cluster: tests/integration/test_shm_weight_sync.py)."""
    from megatron_rlhf.workers import rollout_worker

    monkeypatch.setattr(rollout_worker, "on_the_only_host", lambda: True)
    assert rollout_worker.disaggregated_transfer_backend(on_gpu=True) == "nccl"
    assert rollout_worker.disaggregated_transfer_backend(on_gpu=False) == "shm"
    monkeypatch.setattr(rollout_worker, "on_the_only_host", lambda: False)
    assert rollout_worker.disaggregated_transfer_backend(on_gpu=True) == "nccl"
    assert rollout_worker.disaggregated_transfer_backend(on_gpu=False) == "gloo"
