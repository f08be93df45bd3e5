"""Step labelling without an engine: parsing (file:line errors), labels from grades, batching,
the resume bookkeeping of the output file, and the rollout contexts' token ids.

The rollouts themselves (real vLLM) are tested in tests/integration/test_step_labels_and_bon.py.
"""

from __future__ import annotations

import json

import pytest

from megatron_rlhf.data.jsonl import DatasetError
from megatron_rlhf.data.reward_data import parse_step_labelled_response
from megatron_rlhf.evaluation.step_labels import (
    Solution,
    StepLabelConfig,
    StepLabelWriter,
    completed_ids,
    grade_of,
    labelled_record,
    plan_batches,
    prefix_text,
    read_solutions,
    rolled_out_steps,
    rollout_context_ids,
    step_success_rates,
)
from megatron_rlhf.rewards.sample import RewardResult, Verdict


def solution(solution_id: str = "a", steps: int = 3) -> Solution:
    return Solution(solution_id, "What is 2 + 3?", tuple(f"step {i}" for i in range(steps)), "5", "math")


def write_lines(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_malformed_solution_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "solutions.jsonl"
    good = {"id": "a", "prompt": "p", "steps": ["x = 1", "x + 1 = 2"], "ground_truth": "2"}
    write_lines(path, [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "id": "b", "steps": []}),
        json.dumps({**good, "id": "c", "steps": ["one\ntwo"]}),
        json.dumps({"id": "d", "prompt": "p", "steps": ["s"]}),
        json.dumps(good),
        "",
        json.dumps({**good, "id": "e", "domain": "code"}),
    ])
    dataset = read_solutions(path, strict=False)
    assert [s.id for s in dataset.records] == ["a", "e"] and dataset.lines == [1, 8]
    assert dataset.records[0].domain == "math" and dataset.records[1].domain == "code"
    reasons = {bad.line: bad.reason for bad in dataset.malformed}
    assert set(reasons) == {2, 3, 4, 5, 6}
    assert "not valid JSON" in reasons[2]
    assert "non-empty list" in reasons[3]
    assert "separator" in reasons[4]
    assert "ground_truth" in reasons[5]
    assert "already used on line 1" in reasons[6]
    with pytest.raises(DatasetError, match=f"{path}:2: not valid JSON"):
        read_solutions(path)


@pytest.mark.parametrize("grades,expected", [
    ([[True, False, True, True]], [0.75]),
    ([[None, True, False, None]], [0.5]),          # ungraded completions leave the fraction
    ([[None, None]], [None]),                      # nothing graded: no estimate
    ([[], [False, False]], [None, 0.0]),
])
def test_success_rate_counts_only_graded_completions(grades, expected):
    assert step_success_rates(grades) == expected


def test_grade_of_maps_statuses():
    assert grade_of(RewardResult.correct()) is True
    assert grade_of(RewardResult.incorrect(Verdict.WRONG_ANSWER)) is False
    assert grade_of(RewardResult.infra_error(Verdict.SCORER_TIME_LIMIT, "slow")) is None


def test_soft_and_hard_labels_and_the_verified_final_step():
    grades = [[True, False, False, False], [False, False, False, False]]
    soft = labelled_record(solution(), grades, True, StepLabelConfig(rollouts_per_step=4))
    assert soft["step_labels"] == [0.25, 0.0, 1.0]
    assert soft["step_success_rates"] == [0.25, 0.0, 1.0]
    assert soft["label"] == 1 and soft["rollouts_per_step"] == 4
    hard = labelled_record(solution(), grades, False, StepLabelConfig(rollouts_per_step=4, label_type="hard"))
    assert hard["step_labels"] == [1.0, 0.0, 0.0] and hard["label"] == 0
    assert hard["step_success_rates"] == [0.25, 0.0, 0.0]


def test_rollout_mode_labels_every_step_by_rollouts_and_keeps_an_unknown_outcome():
    config = StepLabelConfig(final_step="rollout")
    assert rolled_out_steps(solution(steps=3), config) == [0, 1, 2]
    assert rolled_out_steps(solution(steps=3), StepLabelConfig()) == [0, 1]
    record = labelled_record(solution(), [[True], [True, False], [False]], None, config)
    assert record["step_labels"] == [1.0, 0.5, 0.0] and record["label"] is None


def test_a_step_without_any_graded_completion_leaves_the_solution_unlabelled():
    assert labelled_record(solution(), [[None, None], [True, True]], True, StepLabelConfig()) is None
    assert labelled_record(solution(), [[True], [True]], None, StepLabelConfig()) is None  # final step unknown


def test_output_records_are_valid_prm_training_records():
    record = labelled_record(solution(), [[True, False], [False, False]], True, StepLabelConfig())
    parsed = parse_step_labelled_response(json.loads(json.dumps(record)))
    assert parsed.steps == solution().steps
    assert parsed.step_labels == (0.5, 0.0, 1.0) and parsed.label == 1 and parsed.domain == "math"


def test_batches_respect_the_prefix_budget_and_keep_solutions_whole_and_in_order():
    solutions = [solution(f"s{i}", steps) for i, steps in enumerate([3, 2, 6, 1, 2, 2])]
    config = StepLabelConfig(prefixes_per_batch=3)  # rolled out: 2, 1, 5, 0, 1, 1
    groups = plan_batches(solutions, config)
    assert [[s.id for s in group] for group in groups] == [["s0", "s1"], ["s2"], ["s3", "s4", "s5"]]
    for group in groups:
        prefixes = sum(len(rolled_out_steps(s, config)) for s in group)
        assert prefixes <= 3 or len(group) == 1


def test_resume_bookkeeping_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    assert completed_ids(path) == set()
    writer = StepLabelWriter(path)
    writer.append([{"id": "a", "step_labels": [1.0]}, {"id": 7, "step_labels": [0.0]}])
    writer.close()
    with path.open("a") as handle:
        handle.write('{"id": "b", "step_lab')  # the process died mid-write
    assert completed_ids(path) == {"a", "7"}
    assert path.read_text().endswith("]}\n") and path.read_text().count("\n") == 2


def test_a_foreign_output_file_is_refused_with_its_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    write_lines(path, ['{"id": "a"}', '["not", "a", "record"]'])
    with pytest.raises(ValueError, match=f"{path}:2: not a step-label record"):
        completed_ids(path)


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_rlhf.models.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer(300, seed=0)


def test_rollout_context_is_the_policy_prompt_followed_by_the_step_prefix(tokenizer):
    item = Solution("a", "Add 2 and 3.", ("2 + 3 = 5", "so 5"), "5")
    assert prefix_text(item.steps, 0, "\n") == "2 + 3 = 5\n"
    assert prefix_text(item.steps, 1, "\n") == "2 + 3 = 5\nso 5\n"
    chat = rollout_context_ids(tokenizer, item, 0, StepLabelConfig())
    template = tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat[: len(template)] == list(template)
    assert tokenizer.decode(chat[len(template):]) == "2 + 3 = 5\n"
    plain = rollout_context_ids(tokenizer, item, 1, StepLabelConfig(prompt_format="plain"))
    assert tokenizer.decode(plain) == "Add 2 and 3.2 + 3 = 5\nso 5\n"


@pytest.mark.parametrize("field,value", [
    ("rollouts_per_step", 0), ("label_type", "fuzzy"), ("prompt_format", "raw"), ("final_step", "skip"),
    ("step_separator", ""), ("temperature", 0.0), ("prefixes_per_batch", True),
])
def test_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        StepLabelConfig(**{field: value})
