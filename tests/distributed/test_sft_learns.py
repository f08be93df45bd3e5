"""SFT and GenRM training learn tiny synthetic chat tasks, through the command-line functions.

SFT: `train-sft` (``add_train_sft_arguments`` / ``run_train_sft``) on a tiny llama (vocab 300,
hidden 64, 2 layers) at DP2 with a cosine schedule, on 96 conversations "What is a + b?" ->
"a + b = c." (a, b < 20), validated on 16 held-out conversations (a JSONL of its own). Checked:
the held-out response loss ends below 40% of where it started; the exported HF directory loads
in transformers, has the trained chat template, and its logits equal those of the saved Megatron
checkpoint within 1e-4 (``verify_checkpoint``); the untouched input model differs from it.

GenRM: `train-genrm` (``run_train_genrm``) at PP2 on labelled records ("is this sum right?",
label 1 or 0, with the reference answer in the judge prompt): the held-out judgement loss ends
below 50% of where it started and the exported judge loads in transformers.
"""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

pytestmark = pytest.mark.distributed

VOCAB = 300
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 128}


def _sum_conversations(rng: random.Random, count: int, exclude: set = frozenset()) -> list[dict]:
    """Conversations for ``count`` distinct (a, b) pairs that are not in ``exclude``."""
    pairs: dict[tuple[int, int], dict] = {}
    while len(pairs) < count:
        a, b = rng.randint(0, 19), rng.randint(0, 19)
        if (a, b) not in exclude:
            pairs[(a, b)] = {"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}."}
    return list(pairs.values())


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    root = tmp_path_factory.mktemp("sft_learns")
    path = make_tiny_hf_model("llama", root / "llama", seed=7, vocab_size=VOCAB, tokenizer=tokenizer, **TINY)
    return str(path)


def _parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def sft_run(hf_dir, tmp_path_factory):
    from megatron_rlhf.cli.train_sft import add_arguments as add_train_sft_arguments, run as run_train_sft

    root = tmp_path_factory.mktemp("sft_run")
    rng = random.Random(0)
    valid = _sum_conversations(rng, 16)
    held_out = {tuple(int(n) for n in row["prompt"][len("What is "):-1].split(" + ")) for row in valid}
    train = _sum_conversations(rng, 96, exclude=held_out)
    assert len(held_out) == 16
    out = root / "out"
    args = _parse(add_train_sft_arguments, [
        "--hf", hf_dir, "--data", _write(root / "train.jsonl", train),
        "--valid", _write(root / "valid.jsonl", valid), "--out", str(out),
        "--nproc", "2", "--epochs", "8", "--global-batch-size", "8", "--micro-batch-size", "2",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-steps", "4", "--no-progress",
    ])
    assert run_train_sft(args) == 0
    return out


@pytest.mark.slow
def test_held_out_response_loss_drops(sft_run):
    report = json.loads((sft_run / "sft_report.json").read_text())
    assert len(report["steps"]) == 8 * 96 // 8
    assert report["num_validation_examples"] == 16 and report["skipped_steps"] == 0
    start, end = report["initial_validation_loss"], report["final_validation_loss"]
    assert end < 0.4 * start, f"validation loss {start:.3f} -> {end:.3f}"


@pytest.mark.slow
def test_exported_hf_model_matches_the_checkpoint_and_loads_in_transformers(sft_run, hf_dir, rank_pool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rlhf.checkpoint.verify import verify_checkpoint

    exported = str(sft_run / "hf")
    assert verify_checkpoint(exported, str(sft_run / "checkpoint"), tolerance=1e-4, launcher=rank_pool.run) <= 1e-4
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template is not None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    trained = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        trained_logits = trained(**ids).logits
        original_logits = original(**ids).logits
    assert torch.isfinite(trained_logits).all()
    assert (trained_logits - original_logits).abs().max() > 1.0


def _judge_records(rng: random.Random, count: int) -> list[dict]:
    records = []
    for index in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        right = index % 2 == 0
        shown = a + b if right else a + b + rng.randint(1, 3)
        records.append({"prompt": f"{a} + {b}?", "response": f"{shown}", "reference": str(a + b),
                        "label": int(right)})
    return records


@pytest.mark.slow
def test_genrm_learns_to_write_verdicts(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_rlhf.cli.train_genrm import add_arguments as add_train_genrm_arguments, run as run_train_genrm

    rng = random.Random(1)
    out = tmp_path / "genrm"
    args = _parse(add_train_genrm_arguments, [
        "--hf", hf_dir, "--data", _write(tmp_path / "judge.jsonl", _judge_records(rng, 48)),
        "--valid", _write(tmp_path / "judge_valid.jsonl", _judge_records(rng, 8)),
        "--out", str(out), "--with-reference", "--pp", "2", "--nproc", "2", "--epochs", "6",
        "--global-batch-size", "8", "--micro-batch-size", "4", "--lr", "3e-3", "--no-progress",
        "--no-checkpoint",
    ])
    assert run_train_genrm(args) == 0
    report = json.loads((out / "sft_report.json").read_text())
    assert report["num_examples"] == 48 and report["num_truncated"] == 0
    start, end = report["initial_validation_loss"], report["final_validation_loss"]
    assert end < 0.5 * start, f"judgement loss {start:.3f} -> {end:.3f}"
    assert not (out / "checkpoint").exists()
    AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32)


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["--nproc", "2", "--global-batch-size", "3"], ValueError, "multiple of data_parallel=2"),
        (["--tp", "4"], ValueError, "does not divide num_attention_heads"),
        (["--max-length", "1000"], ValueError, "exceeds max_position_embeddings"),
        (["--global-batch-size", "64"], ValueError, "do not fill one global batch"),
        ([], FileExistsError, "not empty"),
    ],
)
def test_bad_inputs_fail_before_any_rank_starts(hf_dir, tmp_path, extra, error, match):
    from megatron_rlhf.cli.train_sft import add_arguments as add_train_sft_arguments, sft_run_config_from_args
    from megatron_rlhf.trainer.sft_run import plan_sft_run

    data = _write(tmp_path / "train.jsonl", _sum_conversations(random.Random(0), 8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    args = _parse(add_train_sft_arguments, ["--hf", hf_dir, "--data", data, "--out", str(out), *extra])
    with pytest.raises(error, match=match):
        plan_sft_run(sft_run_config_from_args(args))
    assert (out / "old.txt").read_text() == "keep me"


def test_a_malformed_line_is_named_before_any_rank_starts(hf_dir, tmp_path):
    from megatron_rlhf.data.jsonl import DatasetError
    from megatron_rlhf.trainer.genrm import GenRMDataConfig, read_genrm_records
    from megatron_rlhf.trainer.sft_run import SFTRunConfig, plan_sft_run

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "hi"}\n')
    with pytest.raises(DatasetError, match=rf"{data}:2: missing field 'response'"):
        plan_sft_run(SFTRunConfig(hf_dir, str(data), str(tmp_path / "out")))
    records = tmp_path / "judge.jsonl"
    records.write_text('{"prompt": "1 + 1?", "response": "2", "label": 1}\n'
                       '{"prompt": "1 + 1?", "response": "3", "label": 0.5}\n')
    with pytest.raises(DatasetError, match=rf"{records}:2: a binary GenRM label must be 0 or 1"):
        read_genrm_records(records, GenRMDataConfig())
    with pytest.raises(DatasetError, match=rf"{records}:1: with_reference needs"):
        read_genrm_records(records, GenRMDataConfig(with_reference=True))
