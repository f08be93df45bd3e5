"""Every study is seeded independently of where it writes: the same recipe under two ``--out``
folders gives the same seeds, keyed arms, data and base models; another recipe seed changes every
seed. The studies, the runner, the data and the tiny base models run for real; only the arms'
training and evaluation (reward-model training, RL runs, Pre-PPO's engine) are replaced by
recorders of what they were asked to run, since those are what this test checks, not what they
compute (tests/integration/test_studies_quick.py runs them)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from megatron_rlhf.studies import lab, pre_ppo_study, reward_studies, rl_studies
from megatron_rlhf.studies.lab import run_studies
from megatron_rlhf.studies.recipe import QUICK, StudyRecipe
from megatron_rlhf.studies.runner import StudyContext, is_current_key_file


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _record_arms(monkeypatch) -> list[tuple]:
    """Replace the arms' heavy work by recorders of (study, arm, seed, inputs by content)."""
    from megatron_rlhf.evaluation.best_of_n import bon_sizes

    calls: list[tuple] = []

    def train_and_evaluate(context, arm_dir, arm, model, role, records, aggregates=("outcome",)):
        calls.append(("rm", context.name, arm, context.seed(arm), role, Path(model).name,
                      hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()))
        sizes = bon_sizes(context.recipe.bon_n_max)
        return {"arm": arm, "role": role, "records": len(records),
                "curves": {aggregate: [0.5] * len(sizes) for aggregate in aggregates}, "train_metrics": {}}

    def rl_arm(context, arm_dir, policy, algorithm, n, prompts, eval_prompts, reward_yaml, curriculum, seed):
        calls.append(("rl", seed, Path(policy).name, json.dumps(asdict(algorithm), sort_keys=True, default=str), n,
                      _digest(prompts), _digest(eval_prompts), None if curriculum is None else str(curriculum)))
        curves = {key: [0.0] for key in ("reward/mean", "kl/mean", "response/length_mean", "accuracy/math",
                                         "accuracy/code", "score/general")}
        accuracy = {domain: 0.0 for domain in rl_studies.VERIFIED}
        return {"n": n, "policy": policy, "steps": [1], "curves": curves, "accuracy": accuracy, "accuracy_count": 1,
                "accuracy_source": "training rollouts", "training_accuracy": accuracy, "first_step_accuracy": accuracy}

    def train_rm(context, arm_dir, data):
        calls.append(("pre-ppo rm", context.name, context.seed("reward_model")))
        return {"checkpoint": str(arm_dir / "reward_model" / "checkpoint")}

    def select(context, arm_dir, data, checkpoint):
        calls.append(("pre-ppo selection", context.name, context.seed("selection")))
        path = arm_dir / "prompts_selected.jsonl"
        path.write_text(Path(data["prompts_train"]).read_text())
        return {"prompts": str(path), "candidates": 1, "selected": 1, "domains": {}}

    monkeypatch.setattr(reward_studies, "train_and_evaluate", train_and_evaluate)
    monkeypatch.setattr(rl_studies, "rl_arm", rl_arm)
    monkeypatch.setattr(pre_ppo_study, "_train_rm", train_rm)
    monkeypatch.setattr(pre_ppo_study, "_select", select)
    return calls


def _run_every_study(monkeypatch, recipe: StudyRecipe, out: Path) -> dict:
    calls = _record_arms(monkeypatch)
    run_studies(list(lab.studies()), recipe, out)
    keys = {path.name: json.loads(path.read_text()) for path in (out / "shared" / "arms").glob("*.key.json")}
    arms = {f"{name}/{path.stem}": json.loads(path.read_text()).get("shared_arm")
            for name in lab.studies() for path in (out / name / "arms").glob("*.json")}
    models = {path.relative_to(out).as_posix(): _digest(path) for path in (out / "shared" / "models").rglob("*")
              if path.is_file()}
    data = {path.name: _digest(path) for path in (out / "shared" / "rl_data").glob("*.jsonl")}
    seeds = {name: {arm: StudyContext(name, recipe, out / name, out / "shared").seed(arm)
                    for arm in ("data", "reward_model", "selection", "orm", "prm")} for name in lab.studies()}
    return {"calls": calls, "keys": keys, "arms": arms, "models": models, "data": data, "seeds": seeds}


def test_every_seed_and_key_of_every_study_is_independent_of_the_output_folder(tmp_path, monkeypatch):
    recipe = StudyRecipe(**QUICK)
    here = _run_every_study(monkeypatch, recipe, tmp_path / "here")
    there = _run_every_study(monkeypatch, recipe, tmp_path / "elsewhere" / "deeper")
    assert here["calls"] and here["keys"] and here["models"] and here["data"]
    assert here == there
    assert all(is_current_key_file(tmp_path / "here" / "shared" / "arms" / name) for name in here["keys"])
    rl_runs = [call for call in here["calls"] if call[0] == "rl"]
    assert len(rl_runs) == len(here["keys"]) < sum(1 for digest in here["arms"].values() if digest)  # shared once

    reseeded = _run_every_study(monkeypatch, replace(recipe, seed=1), tmp_path / "seed1")
    assert reseeded["arms"].keys() == here["arms"].keys() and len(reseeded["keys"]) == len(here["keys"])  # the same
    # arms (keys alike but for the pre-ppo curriculum's own seed)...
    seeds = [call[3] if call[0] == "rm" else call[1] if call[0] == "rl" else call[2] for call in here["calls"]]
    reseeds = [call[3] if call[0] == "rm" else call[1] if call[0] == "rl" else call[2] for call in reseeded["calls"]]
    assert len(seeds) == len(reseeds) and all(a != b for a, b in zip(seeds, reseeds))  # ...seeded anew
    assert reseeded["models"].keys() == here["models"].keys() and reseeded["models"] != here["models"]
    assert reseeded["data"] != here["data"]


@pytest.mark.parametrize("value", ["/abs/prompts.jsonl", "{out}/shared/rl_data/prompts.jsonl"])
def test_a_keyed_arm_keyed_by_a_path_is_refused(tmp_path, value):
    context = StudyContext("s", StudyRecipe(), tmp_path / "s", tmp_path / "shared")
    with pytest.raises(ValueError, match="not by path"):
        context.shared_arm("x", {"prompts": value.format(out=tmp_path)}, lambda arm_dir, seed: {})
    assert not (tmp_path / "shared" / "arms").exists()


def test_a_folder_with_shared_arms_keyed_by_path_is_refused(tmp_path):
    from megatron_rlhf.config.errors import UserError

    arms = tmp_path / "shared" / "arms"
    arms.mkdir(parents=True)
    (arms / "0123.key.json").write_text(json.dumps({"kind": "rl", "prompts": str(tmp_path / "p.jsonl")}))
    with pytest.raises(UserError, match="older megatron-rlhf"):
        run_studies(["rm-data"], StudyRecipe(), tmp_path)
