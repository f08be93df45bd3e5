"""`megatron-rlhf study NAME --quick` for the reward-model studies (``rm-data``, ``prm-vs-orm``,
``rm-size``), into one output folder; each test checks one property of what they wrote, and that
a rerun resumes and a folder of another recipe is refused. The RL studies are
``test_studies_quick.py``; what each runs and costs: ``tests/integration/quick_studies.py``.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.quick_studies import (
    REWARD_STUDIES,
    QuickStudies,
    check_table_plot_and_verdict,
    report_of,
)

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def studies(tmp_path_factory, ray_cluster):
    return QuickStudies(tmp_path_factory.mktemp("studies"))


@pytest.mark.parametrize("name", REWARD_STUDIES)
def test_each_study_writes_a_table_a_plot_and_a_verdict(studies, name):
    check_table_plot_and_verdict(studies, name)


@pytest.mark.parametrize("name", REWARD_STUDIES)
def test_best_of_n_curves_lie_between_zero_and_pass_at_n(studies, name):
    report = report_of(studies, name)
    reference = report["arms"]["reference"]
    assert reference["pass@N"][0] == pytest.approx(reference["random"][0])  # N = 1: the oracle is the first pick
    for arm_name, arm in report["arms"].items():
        if arm_name == "reference":
            continue
        assert arm["seconds"] > 0 and arm["train_metrics"], arm_name  # a real training run
        for curve in arm["curves"].values():
            assert len(curve) == len(reference["sizes"])
            assert all(0.0 <= value <= oracle + 1e-9 for value, oracle in zip(curve, reference["pass@N"]))


def test_prm_vs_orm_reports_every_aggregate(studies):
    report = report_of(studies, "prm-vs-orm")
    assert set(report["arms"]["prm"]["curves"]) == {"last", "min", "product", "mean"}
    assert {"ORM", "PRM (last)", "pass@N", "random"} <= set(report["curves"])


def test_rm_size_trains_one_reward_model_per_size(studies):
    from megatron_rlhf.studies.recipe import QUICK

    report = report_of(studies, "rm-size")
    assert set(report["arms"]) - {"reference"} == {str(size) for size in QUICK["model_sizes"]}
    assert [row[0] for row in report["rows"][: len(QUICK["model_sizes"])]] == list(QUICK["model_sizes"])


def test_a_rerun_resumes_every_finished_arm_without_rerunning_it(studies, capsys):
    from megatron_rlhf.cli import main

    studies_out = studies.run("rm-data")
    arm_files = sorted((studies_out / "rm-data" / "arms").glob("*.json"))
    before = {path: path.read_text() for path in arm_files}
    started = time.perf_counter()
    assert main(["study", "rm-data", "--quick", "--out", str(studies_out)]) == 0
    assert time.perf_counter() - started < 20  # no reward model trained again
    assert {path: path.read_text() for path in arm_files} == before
    assert "study=rm-data verdict=" in capsys.readouterr().out


def test_a_folder_of_another_recipe_is_refused(studies, tmp_path):
    from megatron_rlhf.cli import EXIT_USER_ERROR, main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rm_steps: 5\n")
    assert main(["study", "rm-data", "--quick", "--recipe", str(recipe), "--out", str(studies.run("rm-data"))]) == EXIT_USER_ERROR
