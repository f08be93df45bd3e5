"""Megatron-Core's jit_fuser is a no-op after ``import megatron_rlhf`` on a CPU-only torch, and
only then (:mod:`megatron_rlhf.parallel.megatron_jit`). Each case runs in a fresh interpreter,
where ``sys.modules`` shows what the import pulled in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1].parent

pytestmark = pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None,
                                reason="the no-op applies to CPU-only torch builds")


def _child(code: str) -> dict:
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code + """
import json, sys, torch
import megatron.core.jit as jit
from megatron.core import fusions
from megatron.core.fusions import fused_bias_swiglu
from megatron_rlhf.parallel.megatron_jit import jit_fuser_disabled
print(json.dumps(dict(
    noop=jit.jit_fuser is jit.noop_decorator,
    compiled=jit.jit_fuser is torch.compile,
    dynamo="torch._dynamo" in sys.modules,
    disabled=jit_fuser_disabled(),
    plain_function=type(fused_bias_swiglu.swiglu).__name__ == "function",
)))
"""], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_megatron_imported_after_the_package_has_no_compiled_fusions_and_no_dynamo():
    seen = _child("import megatron_rlhf\nimport megatron.core\n")
    assert seen == dict(noop=True, compiled=False, dynamo=False, disabled=True, plain_function=True)


def test_megatron_imported_before_the_package_is_left_as_it_is():
    seen = _child("import megatron.core\nimport megatron_rlhf\n")
    assert seen["compiled"] and not seen["noop"] and not seen["disabled"] and seen["dynamo"]


def test_a_torch_with_cuda_keeps_megatrons_compiled_fuser():
    seen = _child("import torch\ntorch.version.cuda = '12.4'\nimport megatron_rlhf\nimport megatron.core\n")
    assert seen["compiled"] and not seen["disabled"]


def test_installing_twice_keeps_one_finder():
    result = subprocess.run([sys.executable, "-c", """
import sys, megatron_rlhf
from megatron_rlhf.parallel import megatron_jit
megatron_jit.install(); megatron_jit.install()
print(sum(isinstance(f, megatron_jit._JitFinder) for f in sys.meta_path))
"""], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
