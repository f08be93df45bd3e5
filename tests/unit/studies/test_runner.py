"""The study runner's bookkeeping: an arm's result file marks it done; a folder of another recipe is
refused; reports are written from a study result (no model is run here)."""

from __future__ import annotations

import json

import pytest

from megatron_rlhf.config.errors import UserError
from megatron_rlhf.studies import trend
from megatron_rlhf.studies.recipe import StudyRecipe
from megatron_rlhf.studies.report import write_study_report
from megatron_rlhf.studies.lab import run_studies
from megatron_rlhf.studies.runner import StudyContext, StudyResult


def test_an_arm_is_computed_once_and_then_read_back(tmp_path):
    context = StudyContext("s", StudyRecipe(), tmp_path / "s", tmp_path / "shared")
    calls = []

    def compute(arm_dir):
        calls.append(arm_dir)
        return {"accuracy": 0.5}

    first = context.arm("a", compute)
    second = context.arm("a", compute)
    assert len(calls) == 1 and calls[0] == tmp_path / "s" / "arms" / "a"
    assert first == second and first["accuracy"] == 0.5 and "seconds" in first
    assert not list((tmp_path / "s" / "arms").glob("*.tmp"))


def test_a_failed_arm_leaves_no_result_file(tmp_path):
    context = StudyContext("s", StudyRecipe(), tmp_path / "s", tmp_path / "shared")

    def broken(arm_dir):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        context.arm("a", broken)
    assert not (tmp_path / "s" / "arms" / "a.json").exists()


def test_a_keyed_arm_two_studies_ask_for_runs_once_with_one_seed(tmp_path):
    first = StudyContext("s1", StudyRecipe(), tmp_path / "s1", tmp_path / "shared")
    second = StudyContext("s2", StudyRecipe(), tmp_path / "s2", tmp_path / "shared")
    calls = []

    def compute(arm_dir, seed):
        calls.append((arm_dir, seed))
        return {"seed": seed}

    a = first.shared_arm("x", {"n": 2}, compute)
    b = second.shared_arm("y", {"n": 2}, compute)
    c = second.shared_arm("z", {"n": 4}, compute)
    assert len(calls) == 2 and calls[0][0].parent == tmp_path / "shared" / "arms"
    assert a == b and a["shared_arm"] == b["shared_arm"] != c["shared_arm"]
    assert a["seed"] != c["seed"]  # seeded from the key, not from the study or arm name
    assert json.loads((tmp_path / "s2" / "arms" / "y.json").read_text()) == b  # each study keeps its copy


def test_a_restarted_study_reruns_its_keyed_arms(tmp_path, monkeypatch):
    calls = []

    def study(context):
        context.shared_arm("x", {"n": 2}, lambda arm_dir, seed: calls.append(seed) or {"seed": seed})
        return StudyResult("t", "p", ["a"], [[1]], "x", "y", {"a": ([1, 2], [0.5, 0.6])}, [])

    from megatron_rlhf.studies import lab, runner

    monkeypatch.setattr(lab, "studies", lambda: {"toy": runner.Study("toy", "a toy study", study, False)})
    run_studies(["toy"], StudyRecipe(), tmp_path)
    run_studies(["toy"], StudyRecipe(), tmp_path)
    assert len(calls) == 1
    run_studies(["toy"], StudyRecipe(), tmp_path, restart=True)
    assert len(calls) == 2


def test_arm_seeds_differ_by_arm_and_follow_the_recipe_seed(tmp_path):
    context = StudyContext("s", StudyRecipe(seed=1), tmp_path, tmp_path)
    assert context.seed("a") != context.seed("b")
    assert context.seed("a") == StudyContext("s", StudyRecipe(seed=1), tmp_path, tmp_path).seed("a")
    assert context.seed("a") != StudyContext("s", StudyRecipe(seed=2), tmp_path, tmp_path).seed("a")


def test_a_folder_of_another_recipe_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "recipe.json").write_text(json.dumps({"seed": 99}))
    with pytest.raises(UserError, match="another recipe"):
        run_studies(["rm-data"], StudyRecipe(), tmp_path)
    with pytest.raises(UserError, match="unknown study"):
        run_studies(["no-such-study"], StudyRecipe(), tmp_path)


def test_the_report_holds_the_table_the_verdicts_and_a_plot(tmp_path):
    verdict = trend.ranking_verdict("a beats b", ("a", 0.6), ("b", 0.4), 1000)
    result = StudyResult("title", "paper", ["N", "a", "b"], [[1, 0.6, 0.4], [2, 0.7, 0.4]], "N", "accuracy",
                         {"a": ([1, 2], [0.6, 0.7]), "b": ([1, 2], [0.4, 0.4])}, [verdict])
    paths = write_study_report("demo-study", result, tmp_path)
    markdown = paths["md"].read_text()
    assert "| 2 | 0.700 | 0.400 |" in markdown and "**holds**: a beats b" in markdown
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert json.loads(paths["json"].read_text())["verdicts"][0]["verdict"] == "holds"
