"""GenRM without a model: verdict parsing, judge prompts, SFT examples and configuration.

The source on a real vLLM engine is tested in tests/integration/test_step_labels_and_bon.py.
"""

from __future__ import annotations

import pytest

from megatron_rlhf.rewards.genrm import (
    GenRMConfig,
    genrm_training_examples,
    judge_messages,
    judgement_text,
    parse_judgement,
)


@pytest.mark.parametrize("text,reward,form", [
    ("The answer matches.\nVerdict: correct", 1.0, "verdict"),
    ("Verdict: incorrect", 0.0, "verdict"),
    ("**Verdict:** Correct", 1.0, "verdict"),
    ("### VERDICT - INCORRECT\n", 0.0, "verdict"),
    ("verdict:\n\n  `correct`.", 1.0, "verdict"),
    ("The final verdict is: wrong", 0.0, "verdict"),
    ("Verdict: [[Right]]", 1.0, "verdict"),
    ("Judgement: not correct", 0.0, "verdict"),
    ("Score: 8/10", 0.8, "score"),
    ("**Score**: 10 / 10", 1.0, "score"),
    ("score is 7.5 out of 10", 0.75, "score"),
    ("Rating: 3/5", 0.6, "score"),
    ("Score 6/10", 0.6, "score"),
    ("Score: 4", 0.4, "score"),
    # the last verdict wins: the judge reconsidered
    ("Verdict: correct. Wait, 2 + 2 is not 5. Verdict: incorrect", 0.0, "verdict"),
    ("Score: 3/10 at first, but on reflection\nVerdict: correct", 1.0, "verdict"),
])
def test_readable_verdicts(text, reward, form):
    judgement = parse_judgement(text)
    assert judgement is not None, text
    assert judgement.reward == pytest.approx(reward) and judgement.form == form


@pytest.mark.parametrize("text", [
    "", "I think the response is fine.", "correct", "Verdict: maybe", "Verdict: partially correct",
    "grade 5 students", "Score: 11/10", "Score: 9/10 ... final Score: 15/10", "Verdict:", "\x00" * 50,
])
def test_unreadable_judgements_are_none(text):
    assert parse_judgement(text) is None


def test_parsing_a_huge_judgement_is_fast():
    import time

    text = "verdict " * 200_000 + "score: " * 200_000 + "Verdict: correct"
    started = time.monotonic()
    assert parse_judgement(text).reward == 1.0
    assert time.monotonic() - started < 5.0


def test_judge_prompt_with_and_without_reference():
    with_reference = judge_messages("What is 2 + 3?", "It is 5.", "5")
    without = judge_messages("What is 2 + 3?", "It is 5.", None, "score")
    assert len(with_reference) == len(without) == 1 and with_reference[0]["role"] == "user"
    assert "[Reference answer]\n5\n" in with_reference[0]["content"]
    assert "Reference" not in without[0]["content"] and "Score: k/10" in without[0]["content"]
    assert '"Verdict: correct"' in with_reference[0]["content"]


def test_judge_prompt_clips_long_fields():
    content = judge_messages("q", "x" * 10_000 + "THE END", "5", max_field_chars=1000)[0]["content"]
    assert "characters omitted" in content and "THE END" in content and len(content) < 2000


@pytest.mark.parametrize("label,verdict_format", [(1, "binary"), (0, "binary"), (True, "binary"), (0.7, "score"), (0.0, "score")])
def test_training_targets_parse_back_to_their_label(label, verdict_format):
    assert parse_judgement(judgement_text(label, verdict_format, "Checked step by step.")).reward == pytest.approx(float(label))


def test_training_examples_are_sft_chat_examples_with_loss_on_the_judgement():
    from megatron_rlhf.data.chat import parse_chat_record, tokenize_chat
    from megatron_rlhf.models.tiny import train_tiny_tokenizer

    records = [
        {"prompt": "What is 2 + 3?", "response": "5", "label": 1, "ground_truth": "5"},
        {"prompt": "What is 2 + 2?", "response": "5", "label": 0, "reference": "4", "rationale": "2 + 2 = 4, not 5."},
    ]
    examples = genrm_training_examples(records, with_reference=True)
    assert [e["messages"][1]["content"] for e in examples] == ["Verdict: correct", "2 + 2 = 4, not 5.\nVerdict: incorrect"]
    assert examples[1]["messages"][0] == judge_messages("What is 2 + 2?", "5", "4")[0]
    without = genrm_training_examples(records, with_reference=False)
    assert "Reference" not in without[0]["messages"][0]["content"]
    tokenizer = train_tiny_tokenizer(300, seed=0)
    tokenized = tokenize_chat(tokenizer, parse_chat_record(examples[0]), max_length=512)
    target_ids = [t for t, m in zip(tokenized.token_ids, tokenized.loss_mask) if m]
    assert tokenizer.decode(target_ids).startswith("Verdict: correct")


@pytest.mark.parametrize("record,message", [
    ({"prompt": "q", "response": "r", "label": 1}, "record 0 id='x'.*reference"),
    ({"prompt": "q", "response": "r", "label": 0.5, "ground_truth": "1"}, "binary GenRM label must be 0 or 1"),
    ({"prompt": "q", "response": 3, "label": 1, "ground_truth": "1"}, "'response' must be a string"),
    ({"prompt": "q", "response": "r", "label": "yes", "ground_truth": "1"}, "'label' must be a number"),
])
def test_bad_training_records_are_named(record, message):
    with pytest.raises(ValueError, match=message):
        genrm_training_examples([{"id": "x", **record}], with_reference=True)


def test_score_format_training_records():
    examples = genrm_training_examples([{"prompt": "q", "response": "r", "label": 0.8}], False, verdict_format="score")
    assert examples[0]["messages"][1]["content"] == "Score: 8/10"


@pytest.mark.parametrize("field,value", [
    ("reference", "sometimes"), ("verdict_format", "stars"), ("votes", 0), ("max_new_tokens", 0), ("temperature", -1.0),
])
def test_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        GenRMConfig(**{field: value})


def test_votes_need_sampling():
    with pytest.raises(ValueError, match="temperature"):
        GenRMConfig(votes=4)


def test_genrm_kind_in_reward_configs():
    from megatron_rlhf.rewards.reward_config import reward_config_from_mapping

    config = reward_config_from_mapping({
        "sources": {"judge": {"kind": "genrm", "rollout": {"model_dir": "/judge"}, "reference": "required"}},
        "domains": {"math": {"sources": {"judge": 1.0}}},
    }, "rewards.yaml")
    judge = config.sources["judge"].config
    assert isinstance(judge, GenRMConfig) and judge.rollout.model_dir == "/judge" and judge.reference == "required"
    with pytest.raises(ValueError, match=r"rewards.yaml: sources.judge.*votes"):
        reward_config_from_mapping({"sources": {"judge": {"kind": "genrm", "votes": 0}},
                                    "domains": {"math": {"sources": {"judge": 1.0}}}}, "rewards.yaml")
