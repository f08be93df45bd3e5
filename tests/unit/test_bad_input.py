"""Bad input to the checkpoint tools fails fast, with an error that names the offending value.

The issue asks for "a clear error naming the value, before any work starts" for an unsupported
architecture, a TP size that does not divide the heads or the padded vocabulary, a PP size the
layers do not allow, a missing or corrupt file, and an output in the way. Each test calls the
public entry point (``hf_to_megatron``, ``megatron_to_hf``, ``verify_checkpoint`` or the plan
functions they start with) and checks:

- the exception type a user error maps to in the CLI (ValueError subclasses, FileNotFoundError,
  FileExistsError: exit code 2) and that the message names the value and where it came from;
- that no worker process was started (``launch.spawn`` is replaced by a tripwire), that the call
  took well under the cost of one spawn, and that no output directory was created.

One module fixture converts a tiny model for real (one local process) so that checkpoint-side
checks read a genuine saved checkpoint. The last test runs ``checkpoints_tools/hf_to_megatron.py``
as a user would and checks its ``error:`` line and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from megatron_rlhf.checkpoint.convert import (
    hf_to_megatron,
    megatron_to_hf,
    plan_checkpoint_load,
    plan_hf_to_megatron,
)
from megatron_rlhf.checkpoint.dist_ckpt import METADATA_FILE, CheckpointError
from megatron_rlhf.checkpoint.hf_io import HFCheckpointError
from megatron_rlhf.checkpoint.verify import verify_checkpoint
from megatron_rlhf.config.parallel import ParallelLayoutError
from megatron_rlhf.models.arch import UnsupportedArchitecture
from megatron_rlhf.models.tiny import (
    make_tiny_hf_model,
    tiny_hf_config,
    train_tiny_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 500
"""Not a multiple of 128: Megatron pads it to 512 at TP1/TP2, 768 at TP3."""
FAST_SECONDS = 5.0
"""Validation reads a config and a few file headers; one worker spawn alone costs ~10 s here."""


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(VOCAB, seed=0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    """Tiny llama: 4 layers, 4 heads, 2 KV heads, FFN 256, vocab 500."""
    return make_tiny_hf_model(
        "llama", tmp_path_factory.mktemp("hf") / "llama", vocab_size=VOCAB, tokenizer=tokenizer
    )


@pytest.fixture(scope="module")
def six_head_dir(tmp_path_factory, tokenizer) -> Path:
    """Llama with 6 heads / 3 KV heads / FFN 384: TP=3 divides everything but a vocab of 512."""
    return make_tiny_hf_model(
        "llama", tmp_path_factory.mktemp("hf") / "six_heads", vocab_size=VOCAB, tokenizer=tokenizer,
        hidden_size=192, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
        intermediate_size=384, num_hidden_layers=2,
    )


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, six_head_dir) -> Path:
    """A real checkpoint of ``six_head_dir`` saved at TP1 PP1: padded vocabulary 512 = 2 x 256."""
    out = tmp_path_factory.mktemp("ckpt") / "six_heads_tp1"
    hf_to_megatron(str(six_head_dir), str(out), tensor_parallel=1, pipeline_parallel=1)
    assert json.loads((out / METADATA_FILE).read_text())["padded_vocab_size"] == 512
    return out


@pytest.fixture
def no_workers(monkeypatch):
    """Make starting a worker process fail the test: validation must happen before it."""
    from megatron_rlhf.parallel import launch

    def tripwire(*args, **kwargs):
        raise AssertionError("a worker process was started before the input was validated")

    monkeypatch.setattr(launch, "spawn", tripwire)


def _copy_of(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


def _config_only_dir(root: Path, architecture: str, **overrides) -> Path:
    """A directory holding only config.json (layout checks run before the weights are read)."""
    root.mkdir(parents=True)
    tiny_hf_config(architecture, VOCAB, **overrides).to_json_file(root / "config.json")
    return root


def _two_shards(source: Path, destination: Path) -> Path:
    """``source`` re-saved as two safetensors shards plus an index, as big checkpoints come."""
    _copy_of(source, destination)
    tensors = load_file(destination / "model.safetensors")
    (destination / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file_name, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, str(destination / file_name),
                  metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard_names})
    (destination / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return destination


def _fails_fast(
    call: Callable[[], object], error_type: type[BaseException], *named: str
) -> BaseException:
    """Run ``call``; it must raise ``error_type`` quickly with every string of ``named`` in it."""
    start = time.perf_counter()
    with pytest.raises(error_type) as caught:
        call()
    elapsed = time.perf_counter() - start
    message = str(caught.value)
    for text in named:
        assert text in message, f"{text!r} not in error message: {message}"
    assert elapsed < FAST_SECONDS, f"took {elapsed:.1f} s: work started before validation?"
    return caught.value


# ----------------------------------------------------------------------------- architecture


def test_unsupported_model_type_is_named(tmp_path, no_workers):
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 64,
    }))
    out = tmp_path / "out"
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(out), 1, 1),
                UnsupportedArchitecture, "model_type='gpt2'", str(hf_dir / "config.json"), "llama")
    assert not out.exists()


def test_quantized_checkpoint_is_refused(tmp_path, llama_dir, no_workers):
    hf_dir = _copy_of(llama_dir, tmp_path / "awq")
    _edit_config(hf_dir, quantization_config={"quant_method": "awq", "bits": 4})
    _fails_fast(lambda: plan_hf_to_megatron(str(hf_dir), str(tmp_path / "out"), 1, 1),
                UnsupportedArchitecture, "quantization_config", "awq")


def test_llama3_rope_with_another_original_context_is_refused(tmp_path, llama_dir, no_workers):
    hf_dir = _copy_of(llama_dir, tmp_path / "llama3_4k")
    _edit_config(hf_dir, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 4096,
    })
    _fails_fast(lambda: plan_hf_to_megatron(str(hf_dir), str(tmp_path / "out"), 1, 1),
                UnsupportedArchitecture, "original_max_position_embeddings=4096")


def test_sliding_window_layers_are_refused(tmp_path, no_workers):
    hf_dir = _config_only_dir(tmp_path / "qwen2", "qwen2")
    _edit_config(hf_dir, layer_types=["full_attention", "sliding_attention"] * 2)
    _fails_fast(lambda: plan_hf_to_megatron(str(hf_dir), str(tmp_path / "out"), 1, 1),
                UnsupportedArchitecture, "sliding_attention")


def test_absent_kv_heads_use_the_transformers_default_of_the_family(tmp_path):
    """Qwen2Config assumes 32 KV heads when the field is absent; the error says so."""
    hf_dir = _config_only_dir(tmp_path / "qwen2", "qwen2")
    _edit_config(hf_dir, num_key_value_heads=None)
    _fails_fast(lambda: plan_hf_to_megatron(str(hf_dir), str(tmp_path / "out"), 1, 1),
                UnsupportedArchitecture, "num_key_value_heads=32", "absent from the config")


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "glm", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize(
    "absent",
    [("num_key_value_heads",), ("head_dim",), ("rms_norm_eps",), ("attention_bias",),
     ("rope_parameters", "rope_theta", "partial_rotary_factor")],
)
def test_absent_fields_read_as_transformers_reads_them(architecture, absent):
    """A config.json that leaves a field out means what transformers makes of it, per family."""
    import transformers

    from megatron_rlhf.models.arch import arch_spec_from_hf_config

    # 8 heads so that every family's default KV head count (2, 4, 8, 32 or = heads) is usable.
    config = tiny_hf_config(architecture, VOCAB, num_attention_heads=8, num_key_value_heads=8,
                            head_dim=128).to_dict()
    for key in absent:
        config.pop(key, None)
    reference = transformers.AutoConfig.for_model(**json.loads(json.dumps(config)))
    try:
        spec = arch_spec_from_hf_config(config)
    except UnsupportedArchitecture as error:  # e.g. 32 default KV heads for 8 query heads
        assert reference.num_attention_heads % reference.num_key_value_heads != 0, error
        return
    rope = reference.rope_parameters
    assert spec.num_query_groups == reference.num_key_value_heads
    assert spec.head_dim == (getattr(reference, "head_dim", None)
                             or reference.hidden_size // reference.num_attention_heads)
    assert spec.norm_epsilon == reference.rms_norm_eps
    assert spec.rope_theta == rope["rope_theta"]
    assert spec.rotary_percent == rope.get("partial_rotary_factor", 1.0)
    if architecture == "glm":
        assert spec.qkv_bias == reference.attention_bias


# ----------------------------------------------------------------------------- parallel layout


def test_tp_not_dividing_attention_heads(tmp_path, llama_dir, no_workers):
    out = tmp_path / "out"
    _fails_fast(lambda: hf_to_megatron(str(llama_dir), str(out), tensor_parallel=3,
                                       pipeline_parallel=1),
                ParallelLayoutError, "tensor_parallel=3", "num_attention_heads=4")
    assert not out.exists()


def test_tp_not_dividing_kv_heads(tmp_path, llama_dir, no_workers):
    out = tmp_path / "out"
    _fails_fast(lambda: hf_to_megatron(str(llama_dir), str(out), tensor_parallel=4,
                                       pipeline_parallel=1),
                ParallelLayoutError, "tensor_parallel=4", "num_key_value_heads=2")
    assert not out.exists()


def test_pp_larger_than_layer_count(tmp_path, llama_dir, no_workers):
    out = tmp_path / "out"
    _fails_fast(lambda: hf_to_megatron(str(llama_dir), str(out), tensor_parallel=1,
                                       pipeline_parallel=5),
                ParallelLayoutError, "pipeline_parallel=5", "(4)")
    assert not out.exists()


def test_pp_not_dividing_layer_count(tmp_path, llama_dir, no_workers):
    """Megatron-Core asserts this inside every rank; it must be caught before they start."""
    out = tmp_path / "out"
    _fails_fast(lambda: hf_to_megatron(str(llama_dir), str(out), tensor_parallel=1,
                                       pipeline_parallel=3),
                ParallelLayoutError, "pipeline_parallel=3", "(4)")
    assert not out.exists()


def test_ep_not_dividing_experts(tmp_path, no_workers):
    hf_dir = _config_only_dir(tmp_path / "moe", "qwen3_moe")  # 4 experts
    out = tmp_path / "out"
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(out), 1, 1, expert_parallel=3),
                ParallelLayoutError, "expert_parallel=3", "(4)")
    assert not out.exists()


def test_ep_on_a_dense_model(tmp_path, llama_dir, no_workers):
    _fails_fast(lambda: plan_hf_to_megatron(str(llama_dir), str(tmp_path / "out"), 1, 1, 2),
                ParallelLayoutError, "expert_parallel=2", "no experts")


def test_load_at_tp_not_dividing_saved_padded_vocab(tmp_path, saved_checkpoint, no_workers):
    out = tmp_path / "out"
    _fails_fast(lambda: plan_checkpoint_load(str(saved_checkpoint), str(out), tensor_parallel=3),
                ParallelLayoutError, "tensor_parallel=3", "512")
    _fails_fast(lambda: megatron_to_hf(str(saved_checkpoint), str(out), tensor_parallel=3),
                ParallelLayoutError, "tensor_parallel=3", "512")
    assert not out.exists()


# ----------------------------------------------------------------------------- HF files


def test_missing_config_json(tmp_path, llama_dir, no_workers):
    hf_dir = _copy_of(llama_dir, tmp_path / "no_config")
    (hf_dir / "config.json").unlink()
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(tmp_path / "out"), 1, 1),
                FileNotFoundError, str(hf_dir / "config.json"))


def test_missing_hf_directory(tmp_path, no_workers):
    _fails_fast(lambda: plan_hf_to_megatron(str(tmp_path / "nowhere"), str(tmp_path / "out"), 1, 1),
                FileNotFoundError, str(tmp_path / "nowhere"))


def test_config_json_that_is_not_json(tmp_path, llama_dir, no_workers):
    hf_dir = _copy_of(llama_dir, tmp_path / "bad_json")
    text = (hf_dir / "config.json").read_text()
    broken = text.replace('"hidden_act": "silu",', '"hidden_act": silu,')
    (hf_dir / "config.json").write_text(broken)
    line = next(number for number, content in enumerate(text.splitlines(), start=1)
                if '"hidden_act"' in content)
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(tmp_path / "out"), 1, 1),
                ValueError, str(hf_dir / "config.json"), f"line {line}")


def test_missing_model_safetensors(tmp_path, llama_dir, no_workers):
    hf_dir = _copy_of(llama_dir, tmp_path / "no_weights")
    (hf_dir / "model.safetensors").unlink()
    out = tmp_path / "out"
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(out), 1, 1),
                HFCheckpointError, str(hf_dir), "model.safetensors")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_model_safetensors(tmp_path, llama_dir, no_workers, damage):
    hf_dir = _copy_of(llama_dir, tmp_path / damage)
    weights = hf_dir / "model.safetensors"
    if damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    else:
        weights.write_bytes(b"\x93NUMPY not a safetensors file" * 10)
    out = tmp_path / "out"
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(out), 1, 1),
                HFCheckpointError, str(weights))
    assert not out.exists()


def test_index_naming_a_missing_shard(tmp_path, llama_dir, no_workers):
    hf_dir = _two_shards(llama_dir, tmp_path / "sharded")
    (hf_dir / "model-00002-of-00002.safetensors").unlink()
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(tmp_path / "out"), 1, 1),
                HFCheckpointError, "model.safetensors.index.json",
                "model-00002-of-00002.safetensors")


def test_corrupt_shard_of_an_index(tmp_path, llama_dir, no_workers):
    hf_dir = _two_shards(llama_dir, tmp_path / "sharded")
    shard = hf_dir / "model-00001-of-00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(tmp_path / "out"), 1, 1),
                HFCheckpointError, str(shard))


def test_tensor_missing_from_the_safetensors(tmp_path, llama_dir, no_workers):
    """An untied config without lm_head.weight in the file is caught before the ranks start."""
    hf_dir = _copy_of(llama_dir, tmp_path / "no_head")
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(tmp_path / "out"), 1, 1),
                HFCheckpointError, "lm_head.weight", str(hf_dir))


def test_sharded_checkpoint_plans_like_the_single_file(tmp_path, llama_dir):
    sharded = _two_shards(llama_dir, tmp_path / "sharded")
    single_plan = plan_hf_to_megatron(str(llama_dir), str(tmp_path / "a"), 2, 2)
    sharded_plan = plan_hf_to_megatron(str(sharded), str(tmp_path / "b"), 2, 2)
    assert sharded_plan.arch == single_plan.arch
    assert sharded_plan.padded_vocab == single_plan.padded_vocab == 512


# ----------------------------------------------------------------------------- outputs


def test_non_empty_output_without_overwrite(tmp_path, llama_dir, no_workers):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _fails_fast(lambda: hf_to_megatron(str(llama_dir), str(out), 1, 1),
                FileExistsError, str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "user data"


def test_non_empty_export_output_without_overwrite(tmp_path, saved_checkpoint, no_workers):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _fails_fast(lambda: megatron_to_hf(str(saved_checkpoint), str(out)),
                FileExistsError, str(out), "--overwrite")
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_output_that_is_a_file(tmp_path, llama_dir, no_workers):
    out = tmp_path / "a_file"
    out.write_text("x")
    _fails_fast(lambda: hf_to_megatron(str(llama_dir), str(out), 1, 1, overwrite=True),
                FileExistsError, str(out), "not a directory")


def test_output_that_is_the_input(tmp_path, llama_dir, no_workers):
    hf_dir = _copy_of(llama_dir, tmp_path / "model")
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(hf_dir), 1, 1, overwrite=True),
                ValueError, str(hf_dir), "input")
    assert (hf_dir / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_dir_without_metadata(tmp_path, saved_checkpoint, no_workers):
    ckpt = _copy_of(saved_checkpoint, tmp_path / "no_metadata")
    (ckpt / METADATA_FILE).unlink()
    out = tmp_path / "out"
    _fails_fast(lambda: megatron_to_hf(str(ckpt), str(out)),
                CheckpointError, str(ckpt), METADATA_FILE)
    assert not out.exists()


def test_checkpoint_dir_that_is_a_hf_model(tmp_path, llama_dir, no_workers):
    _fails_fast(lambda: plan_checkpoint_load(str(llama_dir)), CheckpointError, str(llama_dir),
                METADATA_FILE)


def test_missing_checkpoint_dir(tmp_path, no_workers):
    _fails_fast(lambda: megatron_to_hf(str(tmp_path / "nowhere"), str(tmp_path / "out")),
                FileNotFoundError, str(tmp_path / "nowhere"))


def test_corrupt_checkpoint_metadata(tmp_path, saved_checkpoint, no_workers):
    ckpt = _copy_of(saved_checkpoint, tmp_path / "corrupt")
    (ckpt / METADATA_FILE).write_text("{ not json")
    _fails_fast(lambda: plan_checkpoint_load(str(ckpt)), CheckpointError, str(ckpt / METADATA_FILE))


@pytest.mark.parametrize("shard", ["__0_0.distcp", "__0_1.distcp"])
def test_truncated_checkpoint_shard_is_named(tmp_path, saved_checkpoint, no_workers, shard):
    """export-hf of a checkpoint with a truncated shard: the file is named, nothing is written."""
    ckpt = _copy_of(saved_checkpoint, tmp_path / "truncated")
    path = ckpt / "model" / shard
    os.truncate(path, path.stat().st_size // 2)
    _fails_fast(lambda: megatron_to_hf(str(ckpt), str(tmp_path / "out")), CheckpointError, str(path), "truncated")
    assert not (tmp_path / "out").exists()


def test_hf_config_field_of_the_wrong_type_is_named(tmp_path, llama_dir, no_workers):
    hf_dir = _copy_of(llama_dir, tmp_path / "mistyped")
    _edit_config(hf_dir, num_hidden_layers="four")
    _fails_fast(lambda: hf_to_megatron(str(hf_dir), str(tmp_path / "out"), 1, 1),
                UnsupportedArchitecture, str(hf_dir / "config.json"), "num_hidden_layers='four'")


def test_verify_with_missing_hf_dir(tmp_path, saved_checkpoint, no_workers):
    _fails_fast(lambda: verify_checkpoint(str(tmp_path / "nowhere"), str(saved_checkpoint)),
                FileNotFoundError, str(tmp_path / "nowhere"))


def test_verify_with_corrupt_hf_weights(tmp_path, six_head_dir, saved_checkpoint, no_workers):
    hf_dir = _copy_of(six_head_dir, tmp_path / "corrupt")
    weights = hf_dir / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    _fails_fast(lambda: verify_checkpoint(str(hf_dir), str(saved_checkpoint)),
                HFCheckpointError, str(weights))


def test_verify_against_another_vocabulary(tmp_path, six_head_dir, saved_checkpoint, no_workers):
    hf_dir = _copy_of(six_head_dir, tmp_path / "other_vocab")
    _edit_config(hf_dir, vocab_size=600)
    _fails_fast(lambda: verify_checkpoint(str(hf_dir), str(saved_checkpoint)),
                ValueError, "vocab_size=600", "vocab_size=500")


# ----------------------------------------------------------------------------- command line


def test_cli_bad_tp_prints_error_and_exits_2(tmp_path, llama_dir):
    out = tmp_path / "out"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "checkpoints_tools/hf_to_megatron.py", "--hf", str(llama_dir),
         "--out", str(out), "--tp", "3", "--pp", "1"],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    assert "tensor_parallel=3" in error_lines[0] and "num_attention_heads=4" in error_lines[0]
    assert not out.exists()
    assert elapsed < 60, f"{elapsed:.0f} s: the tool should fail before starting ranks"


def test_cli_bad_tp_value_is_an_argument_error(tmp_path, llama_dir):
    result = subprocess.run(
        [sys.executable, "checkpoints_tools/hf_to_megatron.py", "--hf", str(llama_dir),
         "--out", str(tmp_path / "out"), "--tp", "0"],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--tp" in result.stderr and "0" in result.stderr
