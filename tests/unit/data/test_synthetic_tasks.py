"""Synthetic demo tasks: deterministic files with disjoint held-out splits; math ground truths are
right (re-derived from the problem text, and credited by the real math verifier while the wrong
solutions are not); code reference solutions pass their tests in the real sandbox, wrong ones fail;
everything fits a tiny model's 128-token sequences."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from megatron_rlhf.data.prompts import PromptDatasetConfig, load_prompt_dataset
from megatron_rlhf.data.synthetic_tasks import (
    CodeDifficulty,
    DemoDatasetSizes,
    MathDifficulty,
    generate_chat_pair,
    generate_code_task,
    generate_math_task,
    unique_tasks,
    write_demo_datasets,
)
from megatron_rlhf.rewards.sample import RewardSample, RewardStatus, Verdict
from megatron_rlhf.rewards.sandbox.config import SandboxConfig
from megatron_rlhf.rewards.sandbox.executor import Sandbox

SMALL = DemoDatasetSizes(sft_per_domain=20, sft_eval_per_domain=4, prompts_per_domain=16, eval_prompts_per_domain=8,
                         preference_pairs=24, preference_eval_pairs=8)
FAMILY_PREFIXES = ("add_", "plus_", "subtract_", "minus_", "times_", "multiply_by_", "is_multiple_of_", "divisible_by_",
                   "greater_than_", "above_", "first_", "head_", "last_", "tail_", "repeat_", "count_")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxConfig()) as shared:
        yield shared


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompt_of(row: dict) -> str:
    return row["messages"][0]["content"] if "messages" in row else row["prompt"]


def _solve_word_problem(text: str) -> int:
    """Independent reading of the problem text (not the generator's arithmetic)."""
    value = int(re.match(r"\w+ has (\d+) ", text).group(1))
    for sentence in re.findall(r"[^.?]+[.?]", text)[1:]:
        if match := re.search(r"(?:buys|finds|gets) (\d+) more", sentence):
            value += int(match.group(1))
        elif match := re.search(r"gives (\d+) to", sentence):
            value -= int(match.group(1))
        elif "doubles" in sentence or "triples" in sentence:
            value *= 2 if "doubles" in sentence else 3
    return value


def test_same_seed_same_bytes_other_seed_other_data(tmp_path) -> None:
    first = write_demo_datasets(tmp_path / "a", seed=5, sizes=SMALL)
    second = write_demo_datasets(tmp_path / "b", seed=5, sizes=SMALL)
    third = write_demo_datasets(tmp_path / "c", seed=6, sizes=SMALL)
    for name, path in vars(first).items():
        assert path.read_bytes() == getattr(second, name).read_bytes(), name
        assert path.read_bytes() != getattr(third, name).read_bytes(), name


def test_files_have_the_schemas_sizes_and_disjoint_splits(tmp_path) -> None:
    paths = write_demo_datasets(tmp_path, seed=0, sizes=SMALL)
    rows = {name: _rows(path) for name, path in vars(paths).items()}
    assert [len(rows[n]) for n in ("sft_train", "sft_eval", "prompts_train", "prompts_eval")] == [60, 12, 48, 24]
    assert len(rows["preference_train"]) == 24 and len(rows["preference_eval"]) == 8
    assert all(set(r) == {"prompt", "chosen", "rejected", "domain"} and r["domain"] == "general"
               and r["chosen"] != r["rejected"] for r in rows["preference_train"] + rows["preference_eval"])
    for row in rows["sft_train"] + rows["sft_eval"]:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    for name in ("sft_train", "prompts_train", "prompts_eval"):
        assert {r["domain"] for r in rows[name]} == {"math", "code", "general"}
    labelled = rows.pop("reasoning_labelled")
    assert len(labelled) == 2 * 2 * 20 and {r["label"] for r in labelled} == {0, 1}
    sft_prompts = {_prompt_of(r) for r in rows["sft_train"]}
    assert all(set(r) == {"prompt", "response", "label", "domain"} and r["prompt"] in sft_prompts for r in labelled)
    owner: dict[str, str] = {}
    for name, file_rows in rows.items():
        for row in file_rows:
            assert owner.setdefault(_prompt_of(row), name) == name, f"{_prompt_of(row)!r} in {owner[_prompt_of(row)]} and {name}"


def test_prompts_fit_72_tokens_and_examples_fit_128_tokens(tmp_path) -> None:
    from megatron_rlhf.models.tiny import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(vocab_size=500, seed=0)
    paths = write_demo_datasets(tmp_path, seed=1, sizes=SMALL)
    for path in (paths.prompts_train, paths.prompts_eval):
        _, stats = load_prompt_dataset(path, PromptDatasetConfig(max_prompt_tokens=72), tokenizer)
        assert stats.skipped == 0, stats.summary()
    longest = max(
        len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False))
        for row in _rows(paths.sft_train) + _rows(paths.sft_eval)
    )
    assert longest <= 128
    pairs = _rows(paths.preference_train)
    assert max(len(tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[side]}], tokenize=True, return_dict=False))
        for r in pairs for side in ("chosen", "rejected")) <= 128


def test_math_difficulty_knobs_and_ground_truths() -> None:
    rng = random.Random(0)
    difficulty = MathDifficulty(operand_min=50, operand_max=60, min_operations=3, max_operations=3, multiplication=False)
    for _ in range(200):
        task = generate_math_task(rng, difficulty)
        assert int(task.answer) == _solve_word_problem(task.prompt) >= 0, task.prompt
        assert task.solution.endswith(f"The answer is {task.answer}.")
        assert len(re.findall(r" (?:buys|finds|gets|gives) ", task.prompt)) == 3 and "doubles" not in task.prompt
        assert all(50 <= int(n) <= 60 for n in re.findall(r"(?:buys|finds|gets|gives) (\d+)", task.prompt))
    easy = [generate_math_task(rng, MathDifficulty()) for _ in range(200)]
    assert all(int(t.answer) == _solve_word_problem(t.prompt) for t in easy)
    assert any("doubles" in t.prompt or "triples" in t.prompt for t in easy)


def test_math_solutions_are_credited_by_the_math_verifier_and_wrong_ones_are_not(sandbox) -> None:
    from megatron_rlhf.rewards.verifiers.math_verifier import (
        MathVerifier,
        MathVerifierConfig,
    )

    tasks = unique_tasks(lambda r: generate_math_task(r, MathDifficulty()), lambda t: t.prompt, 24, random.Random(3), "math")
    verifier = MathVerifier(MathVerifierConfig(workers=1), sandbox=sandbox)
    try:
        right = verifier.score([RewardSample(f"m{i}", "math", t.prompt, t.solution, t.answer) for i, t in enumerate(tasks)])
        wrong = verifier.score([RewardSample(f"w{i}", "math", t.prompt, t.wrong_solution, t.answer) for i, t in enumerate(tasks)])
    finally:
        verifier.close()
    assert [r.verdict for r in right] == [Verdict.OK] * len(tasks), [r.detail for r in right]
    assert all(r.status is RewardStatus.FAILED_VERIFICATION and r.verdict is Verdict.WRONG_ANSWER for r in wrong)


def test_code_reference_solutions_pass_in_the_sandbox_and_wrong_ones_fail(sandbox) -> None:
    from megatron_rlhf.rewards.verifiers.code_verifier import (
        CodeVerifier,
        CodeVerifierConfig,
    )

    tasks = unique_tasks(lambda r: generate_code_task(r, CodeDifficulty()), lambda t: t.prompt, 150, random.Random(4), "code")
    one_per_family = {}
    for task in tasks:  # longest prefix first: "multiply_by_" before ... and "is_multiple_of_" is not "minus_"
        prefix = max((p for p in FAMILY_PREFIXES if task.entry_point.startswith(p)), key=len)
        one_per_family.setdefault(prefix, task)
    assert sorted(one_per_family) == sorted(FAMILY_PREFIXES)
    chosen = list(one_per_family.values())
    verifier = CodeVerifier(CodeVerifierConfig(), sandbox=sandbox)
    try:
        right = verifier.score([RewardSample(t.entry_point, "code", t.prompt, t.solution, t.ground_truth) for t in chosen])
        wrong = verifier.score([RewardSample(t.entry_point, "code", t.prompt, t.wrong_solution, t.ground_truth) for t in chosen])
    finally:
        verifier.close()
    assert [r.verdict for r in right] == [Verdict.OK] * len(chosen), [(t.entry_point, r.detail) for t, r in zip(chosen, right)]
    assert [r.verdict for r in wrong] == [Verdict.WRONG_ANSWER] * len(chosen), [r.detail for r in wrong]


def test_chat_pairs_prefer_the_on_topic_polite_answer() -> None:
    rng = random.Random(2)
    for _ in range(100):
        pair = generate_chat_pair(rng)
        topic = re.findall(r"\w+", pair.prompt)[-1]  # the noun the request is about
        assert re.search(rf"\b{topic}\b", pair.chosen) and not re.search(rf"\b{topic}\b", pair.rejected), pair


def test_too_many_tasks_for_the_ranges_is_a_clear_error(tmp_path) -> None:
    tiny_range = DemoDatasetSizes(sft_per_domain=100, code=CodeDifficulty(constant_max=2))
    with pytest.raises(ValueError, match="distinct code tasks"):
        write_demo_datasets(tmp_path, seed=0, sizes=tiny_range)
