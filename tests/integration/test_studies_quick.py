"""`megatron-rlhf study NAME --quick`, run as a user runs it, into one output folder per module:
all seven studies. Three reward-model studies (``rm-data``, ``prm-vs-orm``, ``rm-size``: real
`train-rm` runs, real scoring, the real math verifier), three RL studies (``responses-per-prompt``,
``policy-size``, ``ppo-vs-grpo``: real ``run_rl`` arms on the tier's session Ray, with real vLLM
engines) and ``pre-ppo`` (a real multi-task reward model, a real Pre-PPO selection: a vLLM engine
samples every training prompt, the reward model scores the answers in a spawned rank; then two
real RL arms with the reward model in the loop). A study runs once, for the first test that needs
it; each test checks one property of what it wrote.

Cost: every RL arm pays its Ray workers and its vLLM engine (about 40 s on two idle cores). The
GRPO arm that ``responses-per-prompt`` (n = rl_n), ``policy-size`` (default size) and
``ppo-vs-grpo`` (``grpo``) each ask for is one keyed run (``StudyContext.shared_arm``): 7 RL arms
asked for, 5 runs. ``pre-ppo`` reuses the folder's base model and RL data (``shared/``) but none
of those runs (its arms train on every domain with the reward model in the loop), so it adds its
reward model, its selection engine and 2 RL runs, all at the smoke size of
``megatron_rlhf.studies.recipe.QUICK``: 282 s in a run (2026-12-07, load 14-33 on two cores) where
the six other studies took 723 s and the module 1020 s (699 s without ``pre-ppo``, load 15-64).
At that size the study's work is negligible; its time is start-up (3 vLLM engines, 2 spawned
Megatron ranks, 2 x 3 Ray worker groups). ``study_seconds.json`` in the output folder records
each study's seconds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

REWARD_STUDIES = ("rm-data", "prm-vs-orm", "rm-size")
RL_STUDIES = ("responses-per-prompt", "policy-size", "ppo-vs-grpo")
RUN_HERE = (*REWARD_STUDIES, *RL_STUDIES, "pre-ppo")
VERDICTS = ("holds", "does not hold", "inconclusive")


class QuickStudies:
    """The module's output folder; :meth:`run` runs a study there once (the first test that needs
    it pays for it, so the per-test timeout bounds one study, not all seven)."""

    def __init__(self, folder):
        self.folder = folder
        self.seconds: dict[str, float] = {}

    def run(self, name: str):
        from megatron_rlhf.cli import main

        if name not in self.seconds:
            started = time.perf_counter()
            assert main(["study", name, "--quick", "--out", str(self.folder)]) == 0
            self.seconds[name] = round(time.perf_counter() - started, 1)
            (self.folder / "study_seconds.json").write_text(json.dumps(self.seconds, indent=2))
        return self.folder


@pytest.fixture(scope="module")
def studies(tmp_path_factory, ray_cluster):
    return QuickStudies(tmp_path_factory.mktemp("studies"))


def _report(studies, name):
    return json.loads((studies.run(name) / name / "report.json").read_text())


@pytest.mark.parametrize("name", RUN_HERE)
def test_each_study_writes_a_table_a_plot_and_a_verdict(studies, name):
    folder = studies.run(name) / name
    markdown = (folder / "report.md").read_text()
    assert markdown.count("\n|") >= 3, markdown  # header, rule and at least one row
    assert "## Trend against the paper's claim" in markdown
    report = json.loads((folder / "report.json").read_text())
    assert report["verdicts"] and all(v["verdict"] in VERDICTS and v["evidence"] for v in report["verdicts"])
    png = (folder / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000


@pytest.mark.parametrize("name", REWARD_STUDIES)
def test_best_of_n_curves_lie_between_zero_and_pass_at_n(studies, name):
    report = _report(studies, name)
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
    report = _report(studies, "prm-vs-orm")
    assert set(report["arms"]["prm"]["curves"]) == {"last", "min", "product", "mean"}
    assert {"ORM", "PRM (last)", "pass@N", "random"} <= set(report["curves"])


def test_responses_per_prompt_runs_one_rl_arm_per_n(studies):
    from megatron_rlhf.studies.recipe import QUICK

    report = _report(studies, "responses-per-prompt")
    assert [row[0] for row in report["rows"]] == list(QUICK["responses_per_prompt"])
    for n in QUICK["responses_per_prompt"]:
        arm = report["arms"][str(n)]
        assert arm["n"] == n and arm["steps"] == list(range(QUICK["rl_steps"]))
        assert all(len(curve) == QUICK["rl_steps"] for curve in arm["curves"].values())


def test_policy_size_runs_one_rl_arm_per_size(studies):
    from megatron_rlhf.studies.recipe import QUICK

    report = _report(studies, "policy-size")
    assert [row[0] for row in report["rows"]] == list(QUICK["model_sizes"])
    assert set(report["arms"]) == {str(size) for size in QUICK["model_sizes"]}
    for arm in report["arms"].values():
        assert arm["steps"] == list(range(QUICK["rl_steps"])) and arm["n"] == QUICK["rl_n"]


def test_ppo_vs_grpo_runs_three_arms_with_reward_kl_and_length_curves_and_final_accuracy(studies):
    from megatron_rlhf.studies.recipe import QUICK

    report = _report(studies, "ppo-vs-grpo")
    arms = ("ppo", "grpo", "grpo-shrink")
    assert set(report["arms"]) == set(arms) and [row[0] for row in report["rows"]] == list(arms)
    for name in arms:
        curves = report["arms"][name]["curves"]
        assert all(len(curves[key]) == QUICK["rl_steps"] for key in ("reward/mean", "kl/mean", "response/length_mean"))
        assert {f"{name} reward", f"{name} KL"} <= set(report["curves"])
    accuracy = report["columns"].index("accuracy")
    assert all(0.0 <= row[accuracy] <= 1.0 for row in report["rows"])
    assert len(report["verdicts"]) == 3  # accuracy, KL, length


def test_rm_size_trains_one_reward_model_per_size(studies):
    from megatron_rlhf.studies.recipe import QUICK

    report = _report(studies, "rm-size")
    assert set(report["arms"]) - {"reference"} == {str(size) for size in QUICK["model_sizes"]}
    assert [row[0] for row in report["rows"][: len(QUICK["model_sizes"])]] == list(QUICK["model_sizes"])


def test_the_grpo_arm_three_studies_share_is_run_once(studies):
    from megatron_rlhf.studies.recipe import load_study_recipe

    recipe = load_study_recipe(quick=True)
    shared = {_report(studies, "responses-per-prompt")["arms"][str(recipe.rl_n)]["shared_arm"],
              _report(studies, "policy-size")["arms"][str(recipe.hidden_size)]["shared_arm"],
              _report(studies, "ppo-vs-grpo")["arms"]["grpo"]["shared_arm"]}
    assert len(shared) == 1
    arm_files = [path for name in (*RL_STUDIES, "pre-ppo") for path in (studies.run(name) / name / "arms").glob("*.json")]
    asked = [result["shared_arm"] for result in map(json.loads, (path.read_text() for path in arm_files))
             if "shared_arm" in result]  # RL arms; pre-ppo's reward model and selection are its own
    runs = [path for path in (studies.folder / "shared" / "arms").glob("*.json") if not path.name.endswith(".key.json")]
    assert len(runs) == len(set(asked)) == len(asked) - 2 == 7  # three of the 9 RL arms asked for are one run


def test_pre_ppo_trains_a_reward_model_selects_the_hardest_half_and_runs_both_rl_arms(studies):
    from megatron_rlhf.studies.recipe import load_study_recipe

    recipe = load_study_recipe(quick=True)
    report = _report(studies, "pre-ppo")
    arms = report["arms"]
    assert set(arms) == {"reward_model", "selection", "uniform", "pre-ppo"}
    assert arms["reward_model"]["seconds"] > 0 and Path(arms["reward_model"]["checkpoint"]).is_dir()

    selection = arms["selection"]  # every domain's lowest-scoring half (keep_fraction 0.5)
    domains = ("code", "general", "math")
    assert selection["candidates"] == len(domains) * recipe.rl_prompts_per_domain
    assert sorted(selection["domains"]) == list(domains)
    half = math.ceil(recipe.rl_prompts_per_domain / 2)
    assert all(d["selected"] == half and math.isfinite(d["mean_score"]) for d in selection["domains"].values())
    rows = [json.loads(line) for line in Path(selection["prompts"]).read_text().splitlines()]
    assert len(rows) == selection["selected"] == len(domains) * half
    assert sorted(row["domain"] for row in rows) == sorted(domains * half)

    uniform, pre_ppo = arms["uniform"], arms["pre-ppo"]
    assert uniform["shared_arm"] != pre_ppo["shared_arm"]  # two RL runs
    for arm in (uniform, pre_ppo):
        assert arm["steps"] == list(range(recipe.rl_steps)) and arm["n"] == recipe.rl_n
        assert all(len(curve) == recipe.rl_steps for curve in arm["curves"].values())
        assert Path(arm["policy"]).is_dir()
    # The curriculum's first phase is math and code only: no general prompt, and with 2 prompts per
    # step one of each verified domain.
    switch = max(1, round(recipe.rl_steps / 3))
    curves = pre_ppo["curves"]
    assert all(math.isnan(score) for score in curves["score/general"][:switch])
    assert all(math.isfinite(value) for d in ("math", "code") for value in curves[f"accuracy/{d}"][:switch])

    # The reward-hacking measures: growth of the length, of the RM's raw score on general chat and
    # of the verifiers' accuracy, each the last minus the first finite point of its curve.
    def finite(values):
        return [value for value in values if math.isfinite(value)]

    def growth(curve):
        return finite(curve)[-1] - finite(curve)[0] if finite(curve) else math.nan

    columns = report["columns"]
    assert [row[0] for row in report["rows"]] == ["uniform", "pre-ppo"]
    for row in report["rows"]:
        arm_curves = arms[row[0]]["curves"]
        verified = [sum(finite(pair)) / len(finite(pair)) if finite(pair) else math.nan
                    for pair in zip(arm_curves["accuracy/math"], arm_curves["accuracy/code"])]
        expected = {"length growth": growth(arm_curves["response/length_mean"]),
                    "RM score growth (general)": growth(arm_curves["score/general"]),
                    "verifier accuracy growth": growth(verified)}
        for column, value in expected.items():
            measured = row[columns.index(column)]
            assert measured == pytest.approx(value, nan_ok=True), (row[0], column)
        assert math.isfinite(row[columns.index("length growth")])  # every step has responses
    assert {"uniform length", "pre-ppo length", "uniform RM score (general)",
            "pre-ppo RM score (general)"} <= set(report["curves"])


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
