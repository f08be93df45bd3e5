"""What a Megatron rank process imports (a fresh interpreter: a one-rank gloo world in a subprocess).

A reference rank whose spec carries the tokenizer's size (RL runs count it once in the driver)
loads its model without importing transformers, and, on a CPU-only torch, without TorchDynamo
(:mod:`megatron_rlhf.parallel.megatron_jit`); its vocabulary is the one a rank counts by loading
the tokenizer itself (the spec without the size).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

_RANK = """
import json, sys
from megatron_rlhf.workers.megatron_worker import ReferenceWorker, RoleWorkerSpec
size = json.loads(sys.argv[2])
worker = ReferenceWorker(0, 1, RoleWorkerSpec(hf_dir=sys.argv[1], tokenizer_size=size))
worker.join_process_group(*worker.rendezvous_address())
print(json.dumps(dict(valid=worker.valid_vocab_size, transformers="transformers" in sys.modules,
                      dynamo="torch._dynamo" in sys.modules)))
"""


def _rank(model_dir: str, size: int | None) -> dict:
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", _RANK, model_dir, json.dumps(size)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_rank_given_the_tokenizer_size_imports_neither_transformers_nor_dynamo(tmp_path):
    from transformers import AutoTokenizer

    from megatron_rlhf.models.tiny import make_tiny_hf_model
    from megatron_rlhf.workers.megatron_worker import defined_vocab_size

    model_dir = str(make_tiny_hf_model("llama", tmp_path / "policy", vocab_size=320, hidden_size=64,
                                       num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
                                       num_hidden_layers=1))
    tokens = len(AutoTokenizer.from_pretrained(model_dir))
    given = _rank(model_dir, tokens)
    assert given["valid"] == defined_vocab_size(model_dir, 320) == min(tokens, 320)  # counted by loading
    assert not given["transformers"]
    if torch.version.cuda is None and torch.version.hip is None:
        assert not given["dynamo"]
