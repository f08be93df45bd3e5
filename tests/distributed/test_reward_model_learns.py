"""A tiny ORM and a tiny PRM, trained end to end with `megatron-rlhf train-rm`, learn held-out data.

The data are made here, so that a random-initialised llama (vocab 300, hidden 64, 2 layers) learns
them in a few hundred steps on a CPU:

- preference pairs: ``Greet <name>.`` -> chosen ``Hello <name>, nice to meet you.``, rejected
  ``Go away <name>.`` (the polite reply is preferred);
- correctness-labelled responses: ``Compare:`` -> ``a<b`` for two distinct digits, label 1 iff
  the comparison is true (a single-digit fact the response either gets right or wrong);
- step-labelled responses (PRM): 1..4 such comparisons, one per line; the step label is 1 while
  every step so far is true and 0 from the first false one on (what Monte-Carlo rollouts give
  when a wrong step cannot be recovered), the outcome is the last step label.

(Single-digit addition, ``3+4=7`` vs ``3+4=8``, needs ~1000 steps before this model "groks" it;
comparisons are learned in ~150, which keeps each training run well under a minute.)

Each model is trained through the CLI entry point (YAML recipe, JSONL files, Megatron trainer,
validation, distributed checkpoint), then loaded from its checkpoint as a reward source and
scored on held-out samples (another seed). Thresholds, on held-out data: ORM pairwise accuracy
>= 0.9 and AUC >= 0.85; PRM step AUC >= 0.85, outcome AUC of the ``min`` aggregate >= 0.85;
chance is 0.5 for all of them. The recipe loader's errors (name the file and the key) are
checked too.
"""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch


pytestmark = pytest.mark.distributed

VOCAB = 300
DATA_PREFIX = {"reward": "orm", "prm": "prm"}
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]


def _pair(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    return {
        "prompt": f"Greet {name}.",
        "chosen": f"Hello {name}, nice to meet you.",
        "rejected": f"Go away {name}.",
        "domain": "chat",
    }


def _comparison(rng: random.Random) -> tuple[str, bool]:
    a, b = rng.sample(range(10), 2)
    return f"{a}<{b}", a < b


def _labelled(rng: random.Random) -> dict:
    step, correct = _comparison(rng)
    return {"prompt": "Compare:", "response": step, "label": int(correct), "domain": "math"}


def _step_labelled(rng: random.Random) -> dict:
    steps, labels, on_track = [], [], True
    for _ in range(rng.randint(1, 4)):
        step, correct = _comparison(rng)
        on_track = on_track and correct
        steps.append(step)
        labels.append(float(on_track))
    return {"prompt": "Compare:", "steps": steps, "step_labels": labels, "domain": "math"}


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path.name


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("reward_learns")
    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    make_tiny_hf_model(
        "llama", root / "model", seed=3, vocab_size=VOCAB, tokenizer=tokenizer, hidden_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        intermediate_size=128,
    )
    train, held_out = random.Random(0), random.Random(1)
    _write(root / "orm_train.jsonl", [make(train) for _ in range(400) for make in (_pair, _labelled)])
    _write(root / "orm_val.jsonl", [make(held_out) for _ in range(100) for make in (_pair, _labelled)])
    _write(root / "prm_train.jsonl", [_pair(train) for _ in range(200)] + [_step_labelled(train) for _ in range(1500)])
    _write(root / "prm_val.jsonl", [_step_labelled(held_out) for _ in range(300)])
    return root


def _train(workdir, role: str, steps: int, training: dict) -> dict:
    import yaml

    from megatron_rlhf.cli.train_rm import add_arguments as add_train_rm_arguments
    from megatron_rlhf.cli.train_rm import run as run_train_rm

    recipe = {
        "model": "model",
        "role": role,
        "train_files": [f"{DATA_PREFIX[role]}_train.jsonl"],
        "validation_files": [f"{DATA_PREFIX[role]}_val.jsonl"],
        "output": f"out_{role}",
        "steps": steps,
        "seed": 1,
        "tokenization": {"prompt_format": "chat", "max_length": 64},
        "training": {**training, "score_micro_batch_size": 64},
        "optimizer": {"lr": 2.0e-3, "adam_beta2": 0.95, "clip_grad": 1.0},
    }
    config = workdir / f"{role}.yaml"
    config.write_text(yaml.safe_dump(recipe))
    parser = argparse.ArgumentParser()
    add_train_rm_arguments(parser)
    assert run_train_rm(parser.parse_args(["--config", str(config), "--nproc", "1"])) == 0
    rows = [json.loads(line) for line in (workdir / f"out_{role}" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == steps and not any(row["skipped"] for row in rows)
    return rows[-1]


@pytest.fixture(scope="module")
def orm_run(workdir):
    mix = {"pairs_per_microbatch": 4, "responses_per_microbatch": 8, "microbatches_per_step": 2}
    return _train(workdir, "reward", 200, mix)


@pytest.fixture(scope="module")
def prm_run(workdir):
    mix = {"pairs_per_microbatch": 2, "responses_per_microbatch": 16, "microbatches_per_step": 2}
    return _train(workdir, "prm", 300, mix)


def test_orm_validation_during_training(orm_run):
    last = orm_run
    assert last["validation/pairwise_accuracy"] >= 0.9
    assert last["validation/auc"] >= 0.85
    assert last["validation/step_auc"] is None  # no step labels for an ORM


def test_prm_validation_during_training(prm_run):
    last = prm_run
    assert last["validation/step_auc"] >= 0.85
    assert last["validation/auc"] >= 0.85


def _score_worker(workdir: str, samples: dict) -> dict:
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.rewards.interface import RewardSource
    from megatron_rlhf.rewards.learned import (
        LearnedRewardConfig,
        load_learned_reward_source,
    )

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=1)
    orm = load_learned_reward_source(f"{workdir}/out_reward/checkpoint", parallel)
    assert isinstance(orm, RewardSource) and orm.name == "reward"
    results = {"orm": {kind: orm.score(batch) for kind, batch in samples.items()}}
    for aggregate in ("last", "min", "product"):
        prm = load_learned_reward_source(
            f"{workdir}/out_prm/checkpoint", parallel, config=LearnedRewardConfig(aggregate=aggregate)
        )
        results[aggregate] = prm.score(samples["steps"])
    return results


@pytest.fixture(scope="module")
def held_out_scores(workdir, orm_run, prm_run, rank_pool):
    from megatron_rlhf.rewards.sample import RewardSample

    rng = random.Random(2)
    pairs = [_pair(rng) for _ in range(50)]
    labelled = [_labelled(rng) for _ in range(200)]
    steps = [_step_labelled(rng) for _ in range(200)]
    samples = {
        "chosen": [RewardSample(f"c{i}", "chat", p["prompt"], p["chosen"]) for i, p in enumerate(pairs)],
        "rejected": [RewardSample(f"r{i}", "chat", p["prompt"], p["rejected"]) for i, p in enumerate(pairs)],
        "labelled": [RewardSample(f"l{i}", "math", r["prompt"], r["response"]) for i, r in enumerate(labelled)],
        "steps": [RewardSample(f"s{i}", "math", r["prompt"], "\n".join(r["steps"])) for i, r in enumerate(steps)],
    }
    scores = rank_pool.run(_score_worker, 1, str(workdir), samples)[0]
    return scores, labelled, steps


def test_orm_scores_held_out_preferences_and_correctness(held_out_scores):
    from megatron_rlhf.evaluation.classification import pairwise_accuracy, roc_auc

    scores, labelled, _ = held_out_scores
    orm = scores["orm"]
    assert all(result.step_rewards is None for result in orm["labelled"])
    chosen = torch.tensor([result.reward for result in orm["chosen"]])
    rejected = torch.tensor([result.reward for result in orm["rejected"]])
    assert pairwise_accuracy(chosen, rejected) >= 0.9
    rewards = torch.tensor([result.reward for result in orm["labelled"]])
    assert roc_auc(rewards, torch.tensor([row["label"] for row in labelled])) >= 0.85


def test_prm_separates_correct_from_incorrect_steps(held_out_scores):
    from megatron_rlhf.evaluation.classification import roc_auc

    scores, _, steps = held_out_scores
    step_scores, step_labels = [], []
    for result, row in zip(scores["last"], steps):
        assert len(result.step_rewards) == len(row["steps"])
        step_scores += result.step_rewards
        step_labels += row["step_labels"]
    assert roc_auc(torch.tensor(step_scores), torch.tensor(step_labels).long()) >= 0.85
    outcomes = torch.tensor([row["step_labels"][-1] for row in steps]).long()
    minimum = torch.tensor([result.reward for result in scores["min"]])
    assert roc_auc(minimum, outcomes) >= 0.85


def test_prm_aggregates_are_last_min_and_product_of_the_step_scores(held_out_scores):
    scores, _, _ = held_out_scores
    for last, minimum, product in zip(scores["last"], scores["min"], scores["product"]):
        assert last.step_rewards == minimum.step_rewards == product.step_rewards
        assert last.reward == pytest.approx(last.step_rewards[-1], abs=1e-6)
        assert minimum.reward == pytest.approx(min(last.step_rewards), abs=1e-6)
        assert product.reward == pytest.approx(float(torch.tensor(last.step_rewards).prod()), rel=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"role": "lm"}, "role='lm'"),
        ({"stepz": 3}, "unknown key(s) ['stepz']"),
        ({"training": {"pairs_per_micro": 1}}, "training: unknown key(s) ['pairs_per_micro']"),
        ({"optimizer": {"lr": -1.0}}, "optimizer: lr=-1.0 must be > 0"),
        ({"tokenization": {"prompt_format": "xml"}}, "tokenization: prompt_format='xml'"),
        ({"train_files": []}, "train_files is empty"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"train_files": "t.jsonl"}, "train_files: expected a list, got 't.jsonl'"),
    ],
)
def test_recipe_errors_name_the_file_and_the_key(tmp_path, change, message):
    import yaml

    from megatron_rlhf.trainer.reward_model_run import load_train_rm_config

    recipe = {"model": "m", "role": "reward", "train_files": ["t.jsonl"], "output": "out", **change}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError) as caught:
        load_train_rm_config(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_recipe_paths_are_relative_to_the_recipe_and_floats_may_omit_the_dot(tmp_path):
    from megatron_rlhf.trainer.reward_model_run import load_train_rm_config

    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model: m\nrole: prm\ntrain_files: [t.jsonl]\noutput: /abs/out\n"
        "optimizer: {lr: 1e-5}\ntokenization: {step_separator: ' ;; '}\n"
    )
    config = load_train_rm_config(path)
    assert config.model == str(tmp_path / "m") and config.train_files == (str(tmp_path / "t.jsonl"),)
    assert config.output == "/abs/out" and config.optimizer.lr == 1e-5
    assert config.tokenization.step_separator == " ;; "


def test_score_takes_a_reward_model_source_from_the_reward_yaml(tmp_path, workdir, held_out_scores):
    """Issue 17 defect 7: the ``kind: reward_model`` YAML of ``train-rl`` is accepted by ``score``,
    which scores with the same model to the same rewards as the learned source in-process."""
    import subprocess
    import sys
    from pathlib import Path

    scores, _, _ = held_out_scores
    rng = random.Random(2)
    pairs = [_pair(rng) for _ in range(50)]
    rows = [{"id": f"c{i}", "domain": "chat", "prompt": p["prompt"], "response": p["chosen"], "ground_truth": None}
            for i, p in enumerate(pairs[:8])]
    _write(tmp_path / "in.jsonl", rows)
    (tmp_path / "rewards.yaml").write_text(
        f"sources: {{rm: {{kind: reward_model, ckpt_dir: {workdir}/out_reward/checkpoint}}}}\n"
        "domains: {chat: {sources: {rm: 1.0}}}\n")
    child = subprocess.run(
        [sys.executable, "-m", "megatron_rlhf", "score", "--input", str(tmp_path / "in.jsonl"),
         "--output", str(tmp_path / "out.jsonl"), "--config", str(tmp_path / "rewards.yaml")],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.splitlines()[-1] == "scored=8 passed=8 failed=0 errors=0"
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = [result.reward for result in scores["orm"]["chosen"][:8]]
    assert [record["reward"] for record in records] == pytest.approx(expected, abs=1e-5)
