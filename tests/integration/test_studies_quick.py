"""`megatron-rlhf study NAME --quick` for the RL studies (``responses-per-prompt``, ``policy-size``,
``ppo-vs-grpo``) and ``pre-ppo``, into one output folder; each test checks one property of what
they wrote. The reward-model studies are ``test_studies_reward_quick.py``; what each runs and
costs: ``tests/integration/quick_studies.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.integration.quick_studies import (
    RL_STUDIES,
    QuickStudies,
    check_table_plot_and_verdict,
    report_of,
)

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def studies(tmp_path_factory, ray_cluster):
    return QuickStudies(tmp_path_factory.mktemp("studies"))


@pytest.mark.parametrize("name", (*RL_STUDIES, "pre-ppo"))
def test_each_study_writes_a_table_a_plot_and_a_verdict(studies, name):
    check_table_plot_and_verdict(studies, name)


def test_responses_per_prompt_runs_one_rl_arm_per_n(studies):
    from megatron_rlhf.studies.recipe import QUICK

    report = report_of(studies, "responses-per-prompt")
    assert [row[0] for row in report["rows"]] == list(QUICK["responses_per_prompt"])
    for n in QUICK["responses_per_prompt"]:
        arm = report["arms"][str(n)]
        assert arm["n"] == n and arm["steps"] == list(range(QUICK["rl_steps"]))
        assert all(len(curve) == QUICK["rl_steps"] for curve in arm["curves"].values())


def test_policy_size_runs_one_rl_arm_per_size(studies):
    from megatron_rlhf.studies.recipe import QUICK

    report = report_of(studies, "policy-size")
    assert [row[0] for row in report["rows"]] == list(QUICK["model_sizes"])
    assert set(report["arms"]) == {str(size) for size in QUICK["model_sizes"]}
    for arm in report["arms"].values():
        assert arm["steps"] == list(range(QUICK["rl_steps"])) and arm["n"] == QUICK["rl_n"]


def test_ppo_vs_grpo_runs_three_arms_with_reward_kl_and_length_curves_and_final_accuracy(studies):
    from megatron_rlhf.studies.recipe import QUICK

    report = report_of(studies, "ppo-vs-grpo")
    arms = ("ppo", "grpo", "grpo-shrink")
    assert set(report["arms"]) == set(arms) and [row[0] for row in report["rows"]] == list(arms)
    for name in arms:
        curves = report["arms"][name]["curves"]
        assert all(len(curves[key]) == QUICK["rl_steps"] for key in ("reward/mean", "kl/mean", "response/length_mean"))
        assert {f"{name} reward", f"{name} KL"} <= set(report["curves"])
    accuracy = report["columns"].index("accuracy")
    assert all(0.0 <= row[accuracy] <= 1.0 for row in report["rows"])
    assert len(report["verdicts"]) == 3  # accuracy, KL, length


def test_the_grpo_arm_three_studies_share_is_run_once(studies):
    from megatron_rlhf.studies.recipe import load_study_recipe

    recipe = load_study_recipe(quick=True)
    shared = {report_of(studies, "responses-per-prompt")["arms"][str(recipe.rl_n)]["shared_arm"],
              report_of(studies, "policy-size")["arms"][str(recipe.hidden_size)]["shared_arm"],
              report_of(studies, "ppo-vs-grpo")["arms"]["grpo"]["shared_arm"]}
    assert len(shared) == 1
    arm_files = [path for name in (*RL_STUDIES, "pre-ppo") for path in (studies.run(name) / name / "arms").glob("*.json")]
    asked = [result["shared_arm"] for result in map(json.loads, (path.read_text() for path in arm_files))
             if "shared_arm" in result]  # RL arms; pre-ppo's reward model and selection are its own
    runs = [path for path in (studies.folder / "shared" / "arms").glob("*.json") if not path.name.endswith(".key.json")]
    assert len(runs) == len(set(asked)) == len(asked) - 2 == 7  # three of the 9 RL arms asked for are one run


def test_pre_ppo_trains_a_reward_model_selects_the_hardest_half_and_runs_both_rl_arms(studies):
    from megatron_rlhf.studies.recipe import load_study_recipe

    recipe = load_study_recipe(quick=True)
    report = report_of(studies, "pre-ppo")
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
