"""`demo --with-genrm`'s pieces that need no engine: the judge's training records derived from the
demo's data, the stage order, the config's validation, the RL stage's hybrid reward, and the
report's per-source contributions (from the metrics the RL loop logs)."""

from __future__ import annotations

import argparse
import json

import pytest

from megatron_rlhf.demo import QUICK, STAGES, DemoConfig
from megatron_rlhf.demo_genrm import (
    bon_reference_rows,
    cap_per_domain,
    contributions_markdown,
    hybrid_reward,
    judge_records,
    source_contributions,
)

LABELLED = [
    {"prompt": "2 + 3?", "response": "2 + 3 = 5. The answer is 5.", "label": 1, "domain": "math"},
    {"prompt": "2 + 3?", "response": "2 + 3 = 6. The answer is 6.", "label": 0, "domain": "math"},
    {"prompt": "only wrong", "response": "bad", "label": 0, "domain": "code"},
]
PAIRS = [{"prompt": "Greet Ann.", "chosen": "Hello, Ann!", "rejected": "Go away.", "domain": "general"}]


def test_judge_records_reference_the_right_solution_and_the_chosen_response() -> None:
    records = judge_records(LABELLED, PAIRS)
    assert records == [
        {"prompt": "2 + 3?", "reference": "2 + 3 = 5. The answer is 5.", "response": "2 + 3 = 5. The answer is 5.",
         "label": 1, "domain": "math"},
        {"prompt": "2 + 3?", "reference": "2 + 3 = 5. The answer is 5.", "response": "2 + 3 = 6. The answer is 6.",
         "label": 0, "domain": "math"},
        {"prompt": "Greet Ann.", "reference": "Hello, Ann!", "response": "Hello, Ann!", "label": 1, "domain": "general"},
        {"prompt": "Greet Ann.", "reference": "Hello, Ann!", "response": "Go away.", "label": 0, "domain": "general"},
    ]


def test_judge_records_are_what_train_genrm_reads_with_references() -> None:
    from megatron_rlhf.rewards.genrm import parse_judgement
    from megatron_rlhf.trainer.genrm import GenRMDataConfig, genrm_chat_examples

    records = judge_records(LABELLED, PAIRS)
    examples = genrm_chat_examples(records, GenRMDataConfig(with_reference=True))
    assert len(examples) == len(records)
    for record, example in zip(records, examples):
        judge_prompt, verdict = example.messages[0].content, example.messages[-1].content
        assert record["reference"] in judge_prompt and record["response"] in judge_prompt
        assert parse_judgement(verdict).reward == record["label"]


def test_judge_records_name_a_row_missing_a_field() -> None:
    with pytest.raises(ValueError, match=r"preference row 0: missing field\(s\) \['rejected'\]"):
        judge_records([], [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match=r"labelled row 1: missing field\(s\) \['label'\]"):
        judge_records([LABELLED[0], {"prompt": "p", "response": "r"}], [])


def test_cap_per_domain_keeps_the_first_records_of_each_domain_in_order() -> None:
    records = [{"domain": d, "i": i} for i, d in enumerate("mmgmggc")]
    assert [r["i"] for r in cap_per_domain(records, 2)] == [0, 1, 2, 4, 6]
    assert cap_per_domain(records, 0) == records


def test_bon_references_are_the_reward_models_best_scored_nonblank_answer() -> None:
    from megatron_rlhf.data.prompts import PromptRecord

    records = [PromptRecord(id="g0", domain="general", prompt="Greet Ann.", messages=None),
               PromptRecord(id="g1", domain="general", prompt="Greet Bob.", messages=None),
               PromptRecord(id="g2", domain="general", prompt="Greet Max.", messages=None),
               PromptRecord(id="m0", domain="math", prompt="1 + 1?", messages=None, ground_truth="2"),
               PromptRecord(id="g0", domain="general", prompt="Greet Ann.", messages=None)]  # Pre-PPO's upweighted copy
    samples = [{"id": "g0", "responses": ["Hi.", "Hello, Ann!", "Hey"], "scores": [0.1, 0.9, 0.9]},
               {"id": "g1", "responses": ["", "Go away."], "scores": [2.0, None]},
               {"id": "m0", "responses": ["3"], "scores": [5.0]}]
    rows = bon_reference_rows(records, samples)
    assert [row.get("ground_truth") for row in rows] == ["Hello, Ann!", None, None, "2", "Hello, Ann!"]
    assert "ground_truth" not in rows[1] and "ground_truth" not in rows[2]  # blank or unscored: no reference
    assert rows[3] == records[3].to_row()


def test_with_genrm_adds_its_stages_after_the_ones_they_need() -> None:
    assert DemoConfig().stages() == STAGES
    stages = DemoConfig(with_genrm=True).stages()
    assert stages == ("prepare", "sft", "reward_model", "genrm", "pre_ppo", "bon_reference", "eval_sft", "rl",
                      "eval_rl", "report")


@pytest.mark.parametrize("field, value", [("genrm_epochs", 0), ("pre_ppo_samples", 0),
                                          ("genrm_records_per_domain", -1), ("genrm_batch_size", 0),
                                          ("genrm_max_new_tokens", 0), ("pre_ppo_samples", True),
                                          ("genrm_weight", float("nan")), ("genrm_rm_weight", "1")])
def test_config_refuses_bad_genrm_values_naming_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        DemoConfig(with_genrm=True, **{field: value})


def test_quick_sizes_are_valid_config_fields() -> None:
    config = DemoConfig(with_genrm=True, **QUICK)
    assert config.rl_steps == QUICK["rl_steps"]
    assert config.genrm_records_per_domain == QUICK["genrm_records_per_domain"]


def test_hybrid_reward_routes_general_chat_to_genrm_and_the_reward_model() -> None:
    from megatron_rlhf.rewards.reward_config import reward_config_from_mapping

    results = {"reward_model": {"checkpoint": "/rm/checkpoint"}, "genrm": {"judge": "/genrm/hf"}}
    plain = hybrid_reward(DemoConfig(), results)
    assert plain["domains"]["general"]["sources"] == {"reward_model": 1.0} and "genrm" not in plain["sources"]
    mapping = hybrid_reward(DemoConfig(with_genrm=True, genrm_weight=1.0, genrm_rm_weight=0.25), results)
    assert mapping["domains"]["general"]["sources"] == {"genrm": 1.0, "reward_model": 0.25}
    assert mapping["domains"]["math"]["sources"] == {"math": 1.0}
    assert mapping["domains"]["code"]["sources"] == {"code": 1.0}
    parsed = reward_config_from_mapping(json.loads(json.dumps(mapping)), "demo reward")  # the YAML the RL stage reads
    genrm = parsed.sources["genrm"]
    assert genrm.kind == "genrm" and genrm.config.reference == "required"
    assert genrm.config.rollout.model_dir == "/genrm/hf"


def test_source_contributions_sum_counts_and_weight_means_over_steps() -> None:
    metrics = [
        {"step": 0, "source/math/mean": 0.5, "source/math/count": 4.0},
        {"step": 1, "source/math/mean": 1.0, "source/math/count": 2.0, "source/genrm/mean": 0.25,
         "source/genrm/count": 4.0, "score/general": 0.1},
    ]
    contributions = source_contributions(metrics)
    assert contributions == {"genrm": {"samples": 4, "mean_reward": 0.25},
                             "math": {"samples": 6, "mean_reward": pytest.approx(2 / 3)}}
    assert "| genrm | 4 | 0.250 |" in contributions_markdown(contributions)


def test_router_results_carry_each_sources_raw_reward_into_the_step_metrics() -> None:
    from megatron_rlhf.rewards.router import DomainRoute, HybridRewardRouter, RouterConfig
    from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus, Verdict
    from megatron_rlhf.trainer.rl_metrics import _reward_metrics

    class Fixed:
        def __init__(self, name: str, value: float) -> None:
            self.name, self.value = name, value

        def score(self, samples):
            return [RewardResult(self.value, RewardStatus.SCORED, Verdict.OK) for _ in samples]

        def close(self) -> None:
            pass

    router = HybridRewardRouter(RouterConfig(domains={
        "general": DomainRoute({"genrm": 1.0, "rm": 0.5}, normalization="batch_zscore"),
        "math": DomainRoute({"verifier": 1.0})}), {"genrm": Fixed("genrm", 1.0), "rm": Fixed("rm", 0.3),
                                                  "verifier": Fixed("verifier", 1.0)})
    samples = [RewardSample(f"s{i}", domain, "p", "r") for i, domain in enumerate(("general", "general", "math"))]
    results = router.score(samples)
    assert results[0].source_rewards == (("genrm", 1.0), ("rm", 0.3))
    prompts = [argparse.Namespace(domain=sample.domain) for sample in samples]
    metrics = _reward_metrics(prompts, results)
    assert metrics["source/genrm/count"] == 2.0 and metrics["source/genrm/mean"] == 1.0
    assert metrics["source/rm/count"] == 2.0 and metrics["source/rm/mean"] == pytest.approx(0.3)
    assert metrics["source/verifier/count"] == 1.0


def test_a_demo_folder_refuses_other_settings_but_takes_older_saves_as_defaults(tmp_path) -> None:
    from dataclasses import asdict

    from megatron_rlhf.demo import run_demo_pipeline

    out = tmp_path / "demo"
    (out / "stages").mkdir(parents=True)
    saved = {k: v for k, v in asdict(DemoConfig(out_dir=str(out))).items() if not k.startswith("genrm")}
    saved.pop("with_genrm")
    (out / "demo_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="holds a demo run with other settings"):
        run_demo_pipeline(DemoConfig(out_dir=str(out), with_genrm=True))
    for name in DemoConfig().stages():  # a finished run: nothing left to do
        (out / "stages" / f"{name}.json").write_text(json.dumps({"stage": name}))
    assert run_demo_pipeline(DemoConfig(out_dir=str(out))) == {"stage": "report"}
