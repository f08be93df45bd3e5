"""Reward-model data: the three JSONL schemas, file:line errors, tokenisation with step boundaries,
batches, the mixed-batch sampler; and the classification metrics the validation reports
(pairwise accuracy, ROC AUC against a brute-force count over all positive/negative pairs)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from megatron_rlhf.data.jsonl import DatasetError
from megatron_rlhf.data.reward_data import (
    LabelledResponse,
    MixedBatchSampler,
    PreferencePair,
    RewardTokenization,
    StepLabelledResponse,
    collate_labelled,
    collate_pairs,
    read_reward_file,
    split_steps,
    tokenize_labelled,
    tokenize_records,
    tokenize_response,
)
from megatron_rlhf.evaluation.classification import pairwise_accuracy, roc_auc

GOOD = [
    {"prompt": "Greet Bob.", "chosen": "Hello Bob.", "rejected": "Go away.", "domain": "chat"},
    {"prompt": "2+2?", "response": "4", "label": 1},
    {"prompt": "2+3?", "steps": ["2+3=5", "so 5"], "step_labels": [1, 0.75], "domain": "math"},
    {"prompt": "2+3?", "steps": ["2+3=6"], "step_labels": [0.0], "label": 0, "id": "extra fields pass"},
]


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_rlhf.models.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer(300, seed=0)


def _write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_the_three_kinds_parse_from_one_file(tmp_path):
    records = read_reward_file(_write(tmp_path / "mixed.jsonl", GOOD)).records
    assert records[0] == PreferencePair("Greet Bob.", "Hello Bob.", "Go away.", "chat")
    assert records[1] == LabelledResponse("2+2?", "4", 1, "general")
    assert records[2] == StepLabelledResponse("2+3?", ("2+3=5", "so 5"), (1.0, 0.75), None, "math")
    assert records[2].outcome == 0.75 and records[3].outcome == 0.0


BAD_LINES = [
    ("not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "p", "response": "r", "label": 2}, "field 'label' must be 0 or 1"),
    ({"prompt": "p", "response": "r"}, "missing field 'label'"),
    ({"prompt": "p", "steps": ["a", "b"], "step_labels": [1]}, "one number per step"),
    ({"prompt": "p", "steps": ["a"], "step_labels": [1.5]}, "step_labels[0]=1.5 is not in [0, 1]"),
    ({"prompt": "p", "steps": ["a"], "step_labels": ["1"]}, "step_labels[0] must be a number"),
    ({"prompt": "p", "steps": ["a\nb"], "step_labels": [1]}, "step 0 contains the step separator"),
    ({"prompt": "p", "steps": [" "], "step_labels": [1]}, "step 0 must be a non-empty string"),
    ({"prompt": "p", "steps": [], "step_labels": []}, "'steps' must be a non-empty list"),
    ({"prompt": 3, "response": "r", "label": 1}, "field 'prompt' must be a string"),
    ({"prompt": "p", "text": "r"}, "not a reward record"),
]


@pytest.mark.parametrize("row, reason", BAD_LINES)
def test_a_malformed_line_is_reported_with_file_and_line(tmp_path, row, reason):
    path = _write(tmp_path / "data.jsonl", [GOOD[0], "", row, GOOD[1]])
    with pytest.raises(DatasetError) as caught:
        read_reward_file(path)
    assert f"{path}:3: " in str(caught.value)
    assert reason in str(caught.value)


def test_non_strict_reading_keeps_the_good_records_and_lists_the_bad(tmp_path):
    path = _write(tmp_path / "data.jsonl", [GOOD[0], "{", GOOD[1], {"prompt": "p"}])
    dataset = read_reward_file(path, strict=False)
    assert len(dataset.records) == 2 and dataset.lines == [1, 3]
    assert [bad.line for bad in dataset.malformed] == [2, 4]


def test_the_separator_is_configurable(tmp_path):
    row = {"prompt": "p", "steps": ["a\nb", "c"], "step_labels": [1, 1]}
    path = _write(tmp_path / "data.jsonl", [row])
    assert read_reward_file(path, separator=" || ").records[0].steps == ("a\nb", "c")
    with pytest.raises(DatasetError, match="contains the step separator"):
        read_reward_file(path, separator="\n")


@pytest.mark.parametrize(
    "response, steps",
    [
        ("a\nb\nc", ["a\n", "b\n", "c"]),
        ("a\nb\n", ["a\n", "b\n"]),
        ("a\n\n  \nb", ["a\n\n  \n", "b"]),
        ("\n\na\nb", ["\n\na\n", "b"]),
        ("", [""]),
        ("no steps", ["no steps"]),
    ],
)
def test_split_steps_keeps_every_character(response, steps):
    assert split_steps(response, "\n") == steps
    assert "".join(split_steps(response, "\n")) == response


def test_boundaries_end_each_step_and_the_final_token_is_eos(tokenizer):
    config = RewardTokenization(prompt_format="plain")
    sequence = tokenize_response(tokenizer, "Add.", "3+4=7\n7+1=8\ndone", config)
    ids = list(sequence.input_ids)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(sequence.boundaries) == 3
    assert [tokenizer.decode([ids[p]]) for p in sequence.boundaries[:2]] == ["\n", "\n"]
    assert sequence.boundaries[-1] == len(ids) - 1
    assert tokenizer.decode(ids[sequence.boundaries[0] + 1 : sequence.boundaries[1] + 1]) == "7+1=8\n"


def test_chat_prompt_format_uses_the_chat_template(tokenizer):
    sequence = tokenize_response(tokenizer, "Hi", "Hello", RewardTokenization(prompt_format="chat"))
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert list(sequence.input_ids[: len(expected)]) == list(expected)


def test_training_and_scoring_tokenise_a_step_labelled_response_identically(tokenizer):
    config = RewardTokenization(step_separator=" ;; ", prompt_format="plain")
    record = StepLabelledResponse("q", ("x = 1", "y = 2", "so 3"), (1.0, 1.0, 0.0), label=1)
    labelled = tokenize_labelled(tokenizer, record, config)
    assert labelled.sequence == tokenize_response(tokenizer, "q", " ;; ".join(record.steps), config)
    assert labelled.targets == (1.0, 1.0, 1.0)  # the last target is the outcome label
    assert labelled.supervised == (True, True, True)


def test_a_labelled_response_supervises_only_its_final_token(tokenizer):
    config = RewardTokenization(prompt_format="plain")
    labelled = tokenize_labelled(tokenizer, LabelledResponse("q", "a\nb", 0), config)
    assert labelled.supervised == (False, True) and labelled.targets == (0.0, 0.0)


def test_records_longer_than_max_length_are_left_out_and_counted(tokenizer):
    config = RewardTokenization(prompt_format="plain", max_length=12)
    records = [LabelledResponse("q", "ok", 1), LabelledResponse("q", "long " * 20, 1),
               PreferencePair("q", "a", "b " * 20)]
    data = tokenize_records(tokenizer, records, config)
    assert len(data.labelled) == 1 and data.pairs == [] and data.dropped_too_long == 2


def test_collated_batches_are_right_padded_with_aligned_targets(tokenizer):
    config = RewardTokenization(prompt_format="plain")
    records = [
        LabelledResponse("q", "short", 1),
        StepLabelledResponse("a longer question", ("s1", "s2", "s3"), (1.0, 0.5, 0.0)),
    ]
    batch = collate_labelled([tokenize_labelled(tokenizer, r, config) for r in records], pad_token_id=2)
    sequences = batch.sequences
    assert sequences.input_ids.shape[1] == int(sequences.lengths.max())
    assert sequences.boundary_positions.shape == (2, 3)
    assert sequences.boundary_positions[0].tolist()[1:] == [-1, -1]
    last = (sequences.boundary_positions >= 0).sum(1) - 1
    assert torch.equal(sequences.boundary_positions.gather(1, last[:, None])[:, 0], sequences.lengths - 1)
    assert (sequences.input_ids[0, int(sequences.lengths[0]) :] == 2).all()
    assert batch.outcome_targets.tolist() == [1.0, 0.0]
    assert batch.supervised.tolist() == [[True, False, False], [True, True, True]]
    short, long = (tokenize_response(tokenizer, "q", text, config) for text in ("a", "b\nc d e f"))
    pairs = collate_pairs([(short, long)], pad_token_id=2)
    assert pairs.chosen.input_ids.shape == pairs.rejected.input_ids.shape == (1, len(long.input_ids))
    assert pairs.chosen.boundary_positions.shape == (1, 2)


def test_the_sampler_is_deterministic_and_covers_each_pass_without_repeats():
    sampler = MixedBatchSampler(num_pairs=10, num_labelled=7, pairs_per_step=2, labelled_per_step=3, seed=5)
    first_pass = [sampler.step(step)[0] for step in range(5)]
    assert sorted(itertools.chain(*first_pass)) == list(range(10))
    assert sampler.step(3) == MixedBatchSampler(10, 7, 2, 3, seed=5).step(3)
    assert sampler.step(0)[0] != sampler.step(5)[0] or sampler.step(1)[0] != sampler.step(6)[0]
    assert MixedBatchSampler(0, 7, 0, 3, seed=5).step(0)[0] == []
    with pytest.raises(ValueError, match="needs 3 labelled responses but the training data has 2"):
        MixedBatchSampler(10, 2, 2, 3, seed=5)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"step_separator": ""}, "step_separator"),
        ({"prompt_format": "markdown"}, "prompt_format"),
        ({"max_length": 1}, "max_length"),
    ],
)
def test_tokenization_settings_are_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        RewardTokenization(**fields)


def _brute_force_auc(scores: list[float], labels: list[int]) -> float:
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_the_pair_count_with_ties(seed):
    rng = random.Random(seed)
    scores = [float(rng.randint(0, 5)) for _ in range(40)]  # many ties
    labels = [rng.randint(0, 1) for _ in range(40)]
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(_brute_force_auc(scores, labels))


def test_auc_extremes_and_undefined_case():
    labels = torch.tensor([0, 0, 1, 1])
    assert roc_auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert roc_auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(torch.zeros(4), labels) == 0.5
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])) is None
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(torch.tensor([float("nan"), 0.0]), torch.tensor([0, 1]))


def test_pairwise_accuracy_counts_ties_as_half():
    chosen, rejected = torch.tensor([2.0, 1.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 3.0, -1.0])
    assert pairwise_accuracy(chosen, rejected) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError, match="chosen scores"):
        pairwise_accuracy(torch.zeros(2), torch.zeros(3))
