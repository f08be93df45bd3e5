"""Synchronous torch_dist saves without Megatron's multiprocessing Manager
(:func:`megatron_rlhf.checkpoint.dist_ckpt.save_sharded`): a one-rank world in a fresh interpreter
saves a tiny model twice and loads it back; no Manager process is started, the process keeps no
``multiprocessing`` temporary directory, and the weights come back equal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_CHILD = """
import json, multiprocessing, sys, torch
from megatron_rlhf.parallel.launch import enter_local_rank, free_port
enter_local_rank(0, 1, free_port(), 1)
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron_rlhf.checkpoint.dist_ckpt import save_sharded
from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.parallel.init import initialize_parallel
initialize_parallel(ParallelConfig(), seed=0)  # gloo, and Megatron's CUDA calls routed to the CPU
weights = torch.arange(12, dtype=torch.float32).reshape(3, 4)
def state(tensor):
    return {"w": ShardedTensor.from_rank_offsets("w", tensor, replica_id=0)}
for name in ("first", "second"):
    save_sharded(state(weights), sys.argv[1] + "/" + name)
loaded = dist_checkpointing.load(state(torch.zeros(3, 4)), sys.argv[1] + "/second")
print(json.dumps(dict(equal=bool(torch.equal(loaded["w"], weights)),
                      children=[child.name for child in multiprocessing.active_children()],
                      tempdir=multiprocessing.current_process()._config.get("tempdir"))))
"""


def test_saves_start_no_manager_and_leave_no_temporary_directory(tmp_path):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", _CHILD, str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == dict(equal=True, children=[], tempdir=None)
