"""The study recipe (typed, strict) and the labelled math candidates of the reward-model studies."""

from __future__ import annotations

import random

import pytest

from megatron_rlhf.config.errors import ConfigError
from megatron_rlhf.studies.math_candidates import candidate, labelled_records, math_problems
from megatron_rlhf.studies.recipe import QUICK, StudyRecipe, load_study_recipe


def test_quick_recipe_overrides_the_defaults_and_a_file_overrides_quick(tmp_path):
    assert load_study_recipe(quick=True).rm_steps == QUICK["rm_steps"]
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("rm_steps: 7\nmodel_sizes: [64, 128, 256]\n")
    recipe = load_study_recipe(recipe_file, quick=True)
    assert recipe.rm_steps == 7 and recipe.model_sizes == (64, 128, 256) and recipe.bon_n_max == QUICK["bon_n_max"]


@pytest.mark.parametrize("text, message", [("rm_step: 3\n", "rm_step"), ("rm_steps: 2.5\n", "rm_steps"),
                                           ("model_sizes: [48]\n", "multiples of 32"),
                                           ("responses_per_prompt: [2]\n", "at least two distinct")])
def test_a_bad_recipe_file_names_the_key(tmp_path, text, message):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_study_recipe(recipe_file)


def test_rm_data_size_must_split_into_every_arm():
    with pytest.raises(ValueError, match="multiple"):
        StudyRecipe(rm_data_size=10, rm_data_responses_per_prompt=(1, 4))


def test_candidates_are_labelled_by_their_first_wrong_step():
    problems = math_problems(20, operations=3, seed=0)
    assert len({problem.prompt for problem in problems}) == 20
    rng = random.Random(0)
    for problem in problems:
        for _ in range(10):
            drawn = candidate(problem, correct_rate=0.3, rng=rng)
            final = drawn.steps[-1].removeprefix("The answer is ").removesuffix(".")
            assert (final == problem.answer) == (drawn.label == 1)
            assert len(drawn.step_labels) == len(drawn.steps) == 4
            assert list(drawn.step_labels) == sorted(drawn.step_labels, reverse=True)  # 1s, then 0s
            assert drawn.step_labels[-1] == float(drawn.label)


def test_labelled_records_are_deterministic_and_in_train_rm_formats():
    problems = math_problems(4, operations=2, seed=1)
    outcome = labelled_records(problems, 3, 0.5, seed=2, with_steps=False)
    steps = labelled_records(problems, 3, 0.5, seed=2, with_steps=True)
    assert outcome == labelled_records(problems, 3, 0.5, seed=2, with_steps=False) and len(outcome) == 12
    assert [row["response"] for row in outcome] == ["\n".join(row["steps"]) for row in steps]
    assert [row["label"] for row in outcome] == [row["label"] for row in steps]
