"""`megatron-rlhf study NAME --quick`, run as a user runs it, once per module: two reward-model
studies (``rm-data``, ``prm-vs-orm``: real `train-rm` runs, real scoring, the real math verifier)
and one RL study (``responses-per-prompt``: real ``run_rl`` arms on the tier's session Ray). Each
test checks one property of what the run wrote.

Not run here, to keep the tier's time budget (each RL arm pays Ray workers and a vLLM engine,
about 40 s on two idle cores): ``rm-size`` (the code path of ``rm-data`` with two base-model
sizes), ``policy-size`` (2 RL arms), ``ppo-vs-grpo`` (3 RL arms) and ``pre-ppo`` (a reward model,
a selection engine and 2 RL arms with the reward model in the loop). They share ``rl_arm``,
``train_and_evaluate`` and the report code with the studies run here; run them with
`megatron-rlhf study NAME --quick`.
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

REWARD_STUDIES = ("rm-data", "prm-vs-orm")
RUN_HERE = (*REWARD_STUDIES, "responses-per-prompt")
VERDICTS = ("holds", "does not hold", "inconclusive")


@pytest.fixture(scope="module")
def studies_out(tmp_path_factory, ray_cluster):
    from megatron_rlhf.cli import main

    out = tmp_path_factory.mktemp("studies")
    for name in RUN_HERE:
        assert main(["study", name, "--quick", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("name", RUN_HERE)
def test_each_study_writes_a_table_a_plot_and_a_verdict(studies_out, name):
    folder = studies_out / name
    markdown = (folder / "report.md").read_text()
    assert markdown.count("\n|") >= 3, markdown  # header, rule and at least one row
    assert "## Trend against the paper's claim" in markdown
    report = json.loads((folder / "report.json").read_text())
    assert report["verdicts"] and all(v["verdict"] in VERDICTS and v["evidence"] for v in report["verdicts"])
    png = (folder / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000


@pytest.mark.parametrize("name", REWARD_STUDIES)
def test_best_of_n_curves_lie_between_zero_and_pass_at_n(studies_out, name):
    report = json.loads((studies_out / name / "report.json").read_text())
    reference = report["arms"]["reference"]
    assert reference["pass@N"][0] == pytest.approx(reference["random"][0])  # N = 1: the oracle is the first pick
    for arm_name, arm in report["arms"].items():
        if arm_name == "reference":
            continue
        assert arm["seconds"] > 0 and arm["train_metrics"], arm_name  # a real training run
        for curve in arm["curves"].values():
            assert len(curve) == len(reference["sizes"])
            assert all(0.0 <= value <= oracle + 1e-9 for value, oracle in zip(curve, reference["pass@N"]))


def test_prm_vs_orm_reports_every_aggregate(studies_out):
    report = json.loads((studies_out / "prm-vs-orm" / "report.json").read_text())
    assert set(report["arms"]["prm"]["curves"]) == {"last", "min", "product", "mean"}
    assert {"ORM", "PRM (last)", "pass@N", "random"} <= set(report["curves"])


def test_responses_per_prompt_runs_one_rl_arm_per_n(studies_out):
    from megatron_rlhf.studies.recipe import QUICK

    report = json.loads((studies_out / "responses-per-prompt" / "report.json").read_text())
    assert [row[0] for row in report["rows"]] == list(QUICK["responses_per_prompt"])
    for n in QUICK["responses_per_prompt"]:
        arm = report["arms"][str(n)]
        assert arm["n"] == n and arm["steps"] == list(range(QUICK["rl_steps"]))
        assert all(len(curve) == QUICK["rl_steps"] for curve in arm["curves"].values())


def test_a_rerun_resumes_every_finished_arm_without_rerunning_it(studies_out, capsys):
    from megatron_rlhf.cli import main

    arm_files = sorted((studies_out / "rm-data" / "arms").glob("*.json"))
    before = {path: path.read_text() for path in arm_files}
    started = time.perf_counter()
    assert main(["study", "rm-data", "--quick", "--out", str(studies_out)]) == 0
    assert time.perf_counter() - started < 20  # no reward model trained again
    assert {path: path.read_text() for path in arm_files} == before
    assert "study=rm-data verdict=" in capsys.readouterr().out


def test_a_folder_of_another_recipe_is_refused(studies_out, tmp_path):
    from megatron_rlhf.cli import EXIT_USER_ERROR, main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rm_steps: 5\n")
    assert main(["study", "rm-data", "--quick", "--recipe", str(recipe), "--out", str(studies_out)]) == EXIT_USER_ERROR
