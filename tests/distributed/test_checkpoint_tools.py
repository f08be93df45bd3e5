"""The three checkpoint tools, run as a user runs them, and the library calls behind them.

The llama TP2 x PP2 case runs ``checkpoints_tools/hf_to_megatron.py``, ``verify.py`` and
``megatron_to_hf.py`` as a user does: subprocesses started with ``sys.executable`` from the
repository root, each starting its own ranks (and ``verify.py`` once more, above its tolerance, for
its exit status). The other cases are about the conversion itself, not the command around it:
they call the functions the tools call (``hf_to_megatron``, ``verify_checkpoint``,
``megatron_to_hf``: the same planning and checks in this process, the same workers) with the
distributed tier's rank pool as their launcher, so no case starts processes of its own. Models are
made here with random weights (norms != 1, biases != 0) and a vocabulary of 500, so Megatron's
vocabulary padding is in play at every TP size. Checked:

- llama at TP2 x PP2: ``verify`` exits 0 and prints ``max_abs_logit_diff=<v>`` last with
  v <= 1e-4; the export gives back every tensor bit for bit (same names, dtypes, values), the same
  config.json, and tokenizer files that load with AutoTokenizer and encode identically;
- resharding: a checkpoint saved at TP2 x PP1 exported with ``--tp 1 --pp 2`` is bit-identical;
- qwen3_moe converted with ``--ep 2`` verifies, and exports bit-identically;
- ``verify --tolerance 1e-12`` exits 1 and still prints the max_abs_logit_diff line last;
- configs users bring: Llama-3.1 rope scaling (llama3, factor 8, original context 8192; the
  weights are scaled up so that unscaled rope would miss the tolerance by ~700x), and a
  transformers-4 style checkpoint with bf16 weights (``"torch_dtype": "bfloat16"``), sharded
  safetensors with an index, top-level ``rope_theta``, no ``num_key_value_heads`` and extra keys;
  and a Mixtral config that leaves ``rms_norm_eps`` and the rope fields to transformers' defaults.

Four tool runs (a fresh Python and fresh ranks each, 10-20 s on a 2-core CPU machine) and eleven
library jobs on the pool's ranks (a few seconds each).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_rlhf.models.tiny import (
    build_tiny_hf_model,
    make_tiny_hf_model,
    tiny_hf_config,
    train_tiny_tokenizer,
)

pytestmark = pytest.mark.distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 500
TOLERANCE = 1e-4
"""verify's documented default tolerance for fp32 checkpoints."""
HALF_PRECISION_TOLERANCE = 5e-2
"""verify's documented default tolerance for bf16/fp16 checkpoints."""
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
"""Llama-3.1's rope_parameters."""
SAMPLE_TEXTS = (
    "Alice has 12 apples. 12 + 3 = 15.",
    "def sort_list(values):\n    return sorted(values)\n",
)
LAST_LINE = re.compile(r"^max_abs_logit_diff=(\S+)$")


# ----------------------------------------------------------------------------- helpers


def run_tool(script: str, *arguments: str | Path) -> subprocess.CompletedProcess:
    """``python checkpoints_tools/<script> ...`` from the repository root, as a user runs it."""
    return subprocess.run(
        [sys.executable, f"checkpoints_tools/{script}", *map(str, arguments)],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )


def run_ok(script: str, *arguments: str | Path) -> subprocess.CompletedProcess:
    result = run_tool(script, *arguments)
    assert result.returncode == 0, (
        f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def reported_diff(result: subprocess.CompletedProcess) -> float:
    """The value of the ``max_abs_logit_diff=<v>`` line, which must be the last line of stdout."""
    lines = result.stdout.strip().splitlines()
    assert lines, f"verify printed nothing on stdout; stderr:\n{result.stderr}"
    match = LAST_LINE.match(lines[-1])
    assert match, f"last stdout line is {lines[-1]!r}, not max_abs_logit_diff=<value>"
    return float(match.group(1))


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, single-file or sharded, read with safetensors directly."""
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file() else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for file_name in files:
        tensors.update(load_file(model_dir / file_name))
    return tensors


def assert_bit_identical(original: Path, exported: Path) -> None:
    expected, actual = hf_tensors(original), hf_tensors(exported)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, f"{name}: {actual[name].dtype} != {tensor.dtype}"
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), f"{name} differs after the round trip"


def convert_verify_export(
    hf_dir: Path, work: Path, layout: tuple[str, ...], export_layout: tuple[str, ...] = ()
) -> dict:
    """The three tools as commands: hf_to_megatron at ``layout``, verify, megatron_to_hf (at
    ``export_layout`` if given)."""
    ckpt, back = work / "ckpt", work / "back"
    run_ok("hf_to_megatron.py", "--hf", hf_dir, "--out", ckpt, *layout)
    verify = run_tool("verify.py", "--hf", hf_dir, "--ckpt", ckpt)
    run_ok("megatron_to_hf.py", "--ckpt", ckpt, "--out", back, *export_layout)
    return {"hf": hf_dir, "ckpt": ckpt, "back": back, "verify_diff": reported_diff_ok(verify)}


def reported_diff_ok(result: subprocess.CompletedProcess) -> float:
    """verify's reported difference, after checking that it exited 0."""
    assert result.returncode == 0, result.stderr
    return reported_diff(result)


def pooled_convert(
    rank_pool, hf_dir: Path, work: Path, layout: dict, export_layout: dict | None = None
) -> dict:
    """What the tools do, as library calls on the rank pool: convert at ``layout`` (``tensor_parallel``,
    ``pipeline_parallel``, ``expert_parallel``), verify at the default tolerance (a difference
    above it raises), then export (at ``export_layout`` if given; skipped when it is None)."""
    from megatron_rlhf.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_rlhf.checkpoint.verify import verify_checkpoint

    ckpt, back = work / "ckpt", work / "back"
    hf_to_megatron(str(hf_dir), str(ckpt), launcher=rank_pool.run, **layout)
    run = {"hf": hf_dir, "ckpt": ckpt, "verify_diff": verify_checkpoint(str(hf_dir), str(ckpt),
                                                                           launcher=rank_pool.run)}
    if export_layout is not None:
        megatron_to_hf(str(ckpt), str(back), launcher=rank_pool.run, **export_layout)
        run["back"] = back
    return run


# ----------------------------------------------------------------------------- models and runs


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(VOCAB, seed=0)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tokenizer) -> dict:
    work = tmp_path_factory.mktemp("llama")
    hf_dir = make_tiny_hf_model("llama", work / "hf", vocab_size=VOCAB, tokenizer=tokenizer)
    return convert_verify_export(hf_dir, work, ("--tp", "2", "--pp", "2"))


@pytest.fixture(scope="module")
def llama3_run(tmp_path_factory, tokenizer, rank_pool) -> dict:
    """Llama-3.1 rope scaling; saved at TP2 x PP1, exported at TP1 x PP2 (resharding)."""
    work = tmp_path_factory.mktemp("llama3")
    hf_dir = make_tiny_hf_model(
        "llama", work / "hf", vocab_size=VOCAB, tokenizer=tokenizer, seed=3,
        rope_parameters=dict(LLAMA3_ROPE), max_position_embeddings=131072,
        # Larger weights make the logits sensitive to the rope frequencies: the same model with
        # unscaled rope differs by ~7e-2 on verify's batch (by ~8e-5 at the default 0.02).
        initializer_range=0.1,
    )
    return pooled_convert(rank_pool, hf_dir, work, {"tensor_parallel": 2, "pipeline_parallel": 1},
                          export_layout={"tensor_parallel": 1, "pipeline_parallel": 2})


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, tokenizer, rank_pool) -> dict:
    work = tmp_path_factory.mktemp("qwen3_moe")
    hf_dir = make_tiny_hf_model("qwen3_moe", work / "hf", vocab_size=VOCAB, tokenizer=tokenizer)
    return pooled_convert(rank_pool, hf_dir, work,
                          {"tensor_parallel": 1, "pipeline_parallel": 1, "expert_parallel": 2}, export_layout={})


@pytest.fixture(scope="module")
def legacy_bf16_run(tmp_path_factory, tokenizer, rank_pool) -> dict:
    """A transformers-4 era checkpoint: bf16, sharded, legacy and missing config fields."""
    work = tmp_path_factory.mktemp("legacy_bf16")
    hf_dir = work / "hf"
    config = tiny_hf_config("llama", VOCAB, tokenizer=tokenizer, num_key_value_heads=4,
                            rope_theta=500000.0)
    model = build_tiny_hf_model(config, seed=5).to(torch.bfloat16)
    model.save_pretrained(hf_dir, max_shard_size="100KB")
    tokenizer.save_pretrained(hf_dir)
    assert (hf_dir / "model.safetensors.index.json").is_file()
    config_path = hf_dir / "config.json"
    saved = json.loads(config_path.read_text())
    assert saved.pop("dtype") == "bfloat16"
    saved["torch_dtype"] = "bfloat16"
    saved["rope_theta"] = saved.pop("rope_parameters")["rope_theta"]
    saved["rope_scaling"] = None
    del saved["num_key_value_heads"]  # Llama: absent means one KV head per query head
    saved.update(_name_or_path="someone/llama-legacy", transformers_version="4.44.2",
                 custom_setting={"nested": [1, 2]})
    config_path.write_text(json.dumps(saved, indent=2))
    return pooled_convert(rank_pool, hf_dir, work, {"tensor_parallel": 1, "pipeline_parallel": 2},
                          export_layout={})


@pytest.fixture(scope="module")
def mixtral_defaults_run(tmp_path_factory, tokenizer, rank_pool) -> dict:
    """Mixtral whose config.json leaves rms_norm_eps and the rope fields to transformers, whose
    Mixtral defaults (1e-5, theta 1e6) are not the other families' (1e-6, theta 1e4)."""
    work = tmp_path_factory.mktemp("mixtral_defaults")
    hf_dir = make_tiny_hf_model("mixtral", work / "hf", vocab_size=VOCAB, tokenizer=tokenizer,
                                rms_norm_eps=1e-5, rope_theta=1e6)
    config = json.loads((hf_dir / "config.json").read_text())
    del config["rms_norm_eps"], config["rope_parameters"]
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    return pooled_convert(rank_pool, hf_dir, work, {"tensor_parallel": 2, "pipeline_parallel": 1})


# ----------------------------------------------------------------------------- llama TP2 x PP2


def test_verify_llama_tp2_pp2(llama_run):
    assert llama_run["verify_diff"] <= TOLERANCE


def test_checkpoint_records_layout_and_padded_vocab(llama_run):
    metadata = json.loads((llama_run["ckpt"] / "megatron_rlhf.json").read_text())
    assert (metadata["tensor_parallel"], metadata["pipeline_parallel"]) == (2, 2)
    assert metadata["padded_vocab_size"] == 512  # 500 padded to a multiple of 128 x TP
    assert (llama_run["ckpt"] / "hf" / "tokenizer.json").is_file()


def test_export_llama_is_bit_identical(llama_run):
    assert_bit_identical(llama_run["hf"], llama_run["back"])


def test_export_llama_config_is_equal(llama_run):
    original = json.loads((llama_run["hf"] / "config.json").read_text())
    exported = json.loads((llama_run["back"] / "config.json").read_text())
    assert exported == original


def test_export_llama_tokenizer_travels(llama_run):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (llama_run["back"] / name).is_file(), name
    original = AutoTokenizer.from_pretrained(llama_run["hf"])
    exported = AutoTokenizer.from_pretrained(llama_run["back"])
    assert len(exported) == len(original)
    for text in SAMPLE_TEXTS:
        assert exported(text)["input_ids"] == original(text)["input_ids"]
    messages = [{"role": "user", "content": SAMPLE_TEXTS[0]}]
    assert exported.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(
        messages, tokenize=False
    )


# ----------------------------------------------------------------------- llama3 rope, resharding


def test_megatron_llama3_rope_frequencies_equal_transformers():
    """Megatron-Core's rope_scaling reproduces transformers' llama3 frequencies exactly."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding,
    )
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for factor in (8.0, 32.0):  # Llama-3.1 and Llama-3.2
        rope = dict(LLAMA3_ROPE, factor=factor)
        config = LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=32,
                             max_position_embeddings=131072, rope_parameters=rope)
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        megatron = RotaryEmbedding(32, 1.0, rotary_base=500000, rope_scaling=True,
                                   rope_scaling_factor=factor, use_cpu_initialization=True)
        assert torch.equal(megatron.inv_freq, expected), factor


def test_verify_llama3_rope_scaling(llama3_run):
    assert llama3_run["verify_diff"] <= TOLERANCE


def test_resharded_export_tp2_pp1_to_tp1_pp2_is_bit_identical(llama3_run):
    metadata = json.loads((llama3_run["ckpt"] / "megatron_rlhf.json").read_text())
    assert (metadata["tensor_parallel"], metadata["pipeline_parallel"]) == (2, 1)
    assert_bit_identical(llama3_run["hf"], llama3_run["back"])
    original = json.loads((llama3_run["hf"] / "config.json").read_text())
    assert json.loads((llama3_run["back"] / "config.json").read_text()) == original


def test_verify_above_tolerance_exits_1_and_prints_the_diff_last(llama3_run):
    result = run_tool("verify.py", "--hf", llama3_run["hf"], "--ckpt", llama3_run["ckpt"],
                      "--tolerance", "1e-12")
    assert result.returncode == 1, result.stderr
    assert reported_diff(result) > 1e-12
    assert "exceeds tolerance" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- MoE, expert parallel


def test_verify_qwen3_moe_ep2(moe_run):
    metadata = json.loads((moe_run["ckpt"] / "megatron_rlhf.json").read_text())
    assert metadata["expert_parallel"] == 2
    assert moe_run["verify_diff"] <= TOLERANCE


def test_export_qwen3_moe_ep2_is_bit_identical(moe_run):
    assert_bit_identical(moe_run["hf"], moe_run["back"])


# ----------------------------------------------------------------------------- legacy bf16 sharded


def test_verify_legacy_bf16_sharded(legacy_bf16_run):
    metadata = json.loads((legacy_bf16_run["ckpt"] / "megatron_rlhf.json").read_text())
    assert metadata["params_dtype"] == "bfloat16"
    assert legacy_bf16_run["verify_diff"] <= HALF_PRECISION_TOLERANCE


def test_export_legacy_bf16_sharded_is_bit_identical(legacy_bf16_run):
    """Every tensor comes back in bf16, norms included (Megatron keeps those in fp32)."""
    assert_bit_identical(legacy_bf16_run["hf"], legacy_bf16_run["back"])
    original = json.loads((legacy_bf16_run["hf"] / "config.json").read_text())
    assert json.loads((legacy_bf16_run["back"] / "config.json").read_text()) == original


# ----------------------------------------------------------------------------- family defaults


def test_verify_mixtral_relying_on_transformers_defaults(mixtral_defaults_run):
    """Read with the llama defaults instead, this model's logits would differ by ~5e-2."""
    assert mixtral_defaults_run["verify_diff"] <= TOLERANCE
