"""ORM and PRM training steps give the same losses, weights and scores under TP2, PP2 and DP2 as TP1 PP1.

A tiny llama (vocab 300, hidden 64, 2 layers) is trained for 3 optimizer steps in each role
(``reward``: Bradley-Terry + outcome BCE; ``prm``: Bradley-Terry at the final token + BCE at every
step boundary) on fixed mixed global batches: 2 preference pairs and 4 labelled responses per step
(plain labelled and step-labelled with 1..4 steps, prompts and responses of unequal lengths), in 2
microbatches of 1 pair + 2 responses, with Megatron's distributed Adam and gradient clipping.
DP2 runs 1 microbatch per rank, the others 2, and the microbatches hold different numbers of
supervised steps, so the exact global normalisation is exercised. Checked against TP1 PP1 within
1e-5 (fp32): the loss of every step, every exported updated tensor, and the scores after training.

Also: the first step's loss equals the global loss recomputed from the scores of the untrained
model with the pure loss functions (a mean over all pairs and all supervised targets, not a mean
of microbatch means); a PRM checkpoint saved at PP2 loads at TP1 and gives the same scores.

Optimizer: Adam with adam_eps=1e-3, for the reason documented in test_train_step_layouts.py
(fp32 reduction-order noise on near-cancelling gradients is amplified by a tiny eps).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-5
STEPS = 3
ROLES = ("reward", "prm")
LAYOUTS = {
    "TP1PP1": (ParallelConfig(), 1),
    "TP2": (ParallelConfig(tensor_parallel=2), 1),
    "PP2": (ParallelConfig(pipeline_parallel=2), 1),
    "DP2": (ParallelConfig(), 2),
}


def _training_config():
    from megatron_rlhf.trainer.reward_model import RewardTrainingConfig

    return RewardTrainingConfig(
        pairs_per_microbatch=1,
        responses_per_microbatch=2,
        microbatches_per_step=2,
        preference_weight=1.0,
        classification_weight=0.5,
        score_micro_batch_size=3,
    )


def _snapshot(exported) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in dict(exported).items()}


def _build(role: str, parallel: ParallelConfig, hf_dir: str, score: torch.Tensor):
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import (
        ModelBuildConfig,
        build_stage_model,
        validate_layout,
    )

    arch = arch_spec_from_hf_dir(hf_dir)
    build = ModelBuildConfig(role=role, transformer_impl="local")
    padded = validate_layout(arch, parallel, build)
    model = build_stage_model(arch, parallel, build)
    load_hf_weights(model, HFWeightReader(hf_dir), arch, role, padded)
    if model.head is not None:
        with torch.no_grad():
            model.head.score.weight.copy_(score)
    return arch, padded, model


def _worker(parallel: ParallelConfig, hf_dir: str, data: dict, ckpt_dir: str | None):
    from megatron_rlhf.checkpoint.dist_ckpt import CheckpointMetadata
    from megatron_rlhf.mapping.engine import export_hf_weights
    from megatron_rlhf.models.arch import load_hf_config
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.rewards.learned import write_reward_model_info
    from megatron_rlhf.training.megatron_step import OptimizerSettings
    from megatron_rlhf.trainer.reward_model import RewardModelTrainer

    state = initialize_parallel(parallel, seed=1)
    report = {}
    for role in ROLES:
        arch, padded, model = _build(role, parallel, hf_dir, data["score"])
        trainer = RewardModelTrainer(
            model, OptimizerSettings(lr=1e-3, adam_eps=1e-3, clip_grad=1.0), _training_config()
        )
        scored = data["score_rows"]
        before = trainer.scorer.score(scored)
        pairs, labelled = data["batches"][0]
        initial = {
            "chosen": trainer.scorer.score(pairs.chosen).final_logits,
            "rejected": trainer.scorer.score(pairs.rejected).final_logits,
        }
        labelled_scores = trainer.scorer.score(labelled.sequences)
        initial["labelled_final"] = labelled_scores.final_logits
        initial["labelled_steps"] = labelled_scores.boundary_logits
        steps = [trainer.train_step(pairs, labelled) for pairs, labelled in data["batches"]]
        after = trainer.scorer.score(scored)
        weights = _snapshot(export_hf_weights(model, arch, role))
        report[role] = {
            "steps": steps,
            "before": before,
            "after": after,
            "weights": weights if state.rank == 0 else None,
            "initial_batch_scores": initial,
            "validation": dataclasses.asdict(trainer.evaluate(*data["batches"][0])),
        }
        if ckpt_dir is not None and role == "prm":
            metadata = CheckpointMetadata(
                role=role, hf_config=load_hf_config(hf_dir), tensor_parallel=parallel.tensor_parallel,
                pipeline_parallel=parallel.pipeline_parallel, expert_parallel=1,
                padded_vocab_size=padded, params_dtype="float32", transformer_impl="local",
            )
            trainer.save_checkpoint(ckpt_dir, metadata, hf_side_dir=hf_dir)
            if state.rank == 0:
                write_reward_model_info(ckpt_dir, role, data["tokenization"])
            torch.distributed.barrier()
    return report


def _load_worker(ckpt_dir: str, samples: list):
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.rewards.learned import (
        LearnedRewardConfig,
        load_learned_reward_source,
    )

    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=1)
    source = load_learned_reward_source(ckpt_dir, parallel, config=LearnedRewardConfig(aggregate="min"))
    return source.score(samples)


def _records(seed: int, count: int):
    from megatron_rlhf.data.reward_data import (
        LabelledResponse,
        PreferencePair,
        StepLabelledResponse,
    )

    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(["alpha", "beta", "7", "x", "sum", "is"]) for _ in range(words))

    pairs = [PreferencePair(text(rng.randint(1, 4)), text(rng.randint(1, 6)), text(rng.randint(1, 6))) for _ in range(count)]
    labelled = []
    for index in range(2 * count):
        prompt = text(rng.randint(1, 5))
        if index % 2:
            labelled.append(LabelledResponse(prompt, "\n".join(text(2) for _ in range(rng.randint(1, 3))), rng.randint(0, 1)))
        else:
            steps = tuple(text(rng.randint(1, 3)) for _ in range(rng.randint(1, 4)))
            labels = tuple(round(rng.random(), 2) for _ in steps)
            labelled.append(StepLabelledResponse(prompt, steps, labels, label=rng.choice([None, 0, 1])))
    return pairs, labelled


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    root = tmp_path_factory.mktemp("reward_layouts")
    return str(
        make_tiny_hf_model(
            "llama", root / "llama", seed=11, vocab_size=VOCAB, tokenizer=tokenizer, hidden_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
            intermediate_size=128,
        )
    )


@pytest.fixture(scope="module")
def data(hf_dir):
    import transformers

    from megatron_rlhf.data.reward_data import (
        RewardTokenization,
        collate_labelled,
        collate_pairs,
        collate_sequences,
        tokenize_labelled,
        tokenize_response,
    )

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tokenization = RewardTokenization(prompt_format="chat")
    pairs, labelled = _records(seed=3, count=2 * STEPS)
    pad = tokenizer.pad_token_id
    tokenized_pairs = [
        (tokenize_response(tokenizer, p.prompt, p.chosen, tokenization),
         tokenize_response(tokenizer, p.prompt, p.rejected, tokenization))
        for p in pairs
    ]
    tokenized_labelled = [tokenize_labelled(tokenizer, record, tokenization) for record in labelled]
    batches = [
        (collate_pairs(tokenized_pairs[2 * s : 2 * s + 2], pad), collate_labelled(tokenized_labelled[4 * s : 4 * s + 4], pad))
        for s in range(STEPS)
    ]
    score_rows = collate_sequences([record.sequence for record in tokenized_labelled[:7]], pad)
    generator = torch.Generator().manual_seed(7)
    return {
        "batches": batches,
        "score_rows": score_rows,
        "score": torch.randn(1, 64, generator=generator) * 0.1,
        "tokenization": tokenization,
        "labelled": labelled[:7],
    }


@pytest.fixture(scope="module")
def results(hf_dir, data, tmp_path_factory, rank_pool):
    cache: dict[str, dict] = {}
    checkpoint = str(tmp_path_factory.mktemp("reward_ckpt") / "prm_pp2")

    def run(layout: str) -> dict:
        if layout not in cache:
            parallel, data_parallel = LAYOUTS[layout]
            ckpt_dir = checkpoint if layout == "PP2" else None
            per_rank = rank_pool.run(_worker, parallel.world_size(data_parallel), parallel, hf_dir, data, ckpt_dir)
            cache[layout] = {"ranks": per_rank, "checkpoint": ckpt_dir, **per_rank[0]}
        return cache[layout]

    return run


OTHER_LAYOUTS = [name for name in LAYOUTS if name != "TP1PP1"]


@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
@pytest.mark.parametrize("role", ROLES)
def test_step_losses_match_tp1pp1(role, layout, results):
    expected = [step.loss for step in results("TP1PP1")[role]["steps"]]
    for report in results(layout)["ranks"]:
        steps = report[role]["steps"]
        assert not any(step.skipped for step in steps)
        actual = [step.loss for step in steps]
        assert actual == pytest.approx(expected, abs=TOLERANCE), f"{role} {layout}: {actual} vs {expected}"


@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
@pytest.mark.parametrize("role", ROLES)
def test_updated_weights_match_tp1pp1(role, layout, results):
    actual, expected = results(layout)[role]["weights"], results("TP1PP1")[role]["weights"]
    assert sorted(actual) == sorted(expected)
    worst = max((actual[name] - expected[name]).abs().max().item() for name in expected)
    assert worst <= TOLERANCE, f"{role} {layout}: max weight difference {worst:.3e}"


@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
@pytest.mark.parametrize("role", ROLES)
def test_scores_match_tp1pp1_on_every_rank(role, layout, results):
    expected = results("TP1PP1")[role]["after"]
    for report in results(layout)["ranks"]:
        actual = report[role]["after"]
        assert torch.allclose(actual.final_logits, expected.final_logits, atol=TOLERANCE, rtol=0)
        if role == "prm":
            assert torch.allclose(actual.boundary_logits, expected.boundary_logits, atol=TOLERANCE, rtol=0)
        for name, value in results("TP1PP1")[role]["validation"].items():
            assert report[role]["validation"][name] == (value if value is None else pytest.approx(value))


def test_training_moved_every_tensor_and_the_scores(hf_dir, results):
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader

    reader = HFWeightReader(hf_dir)
    for role in ROLES:
        report = results("TP1PP1")[role]
        unmoved = [n for n, v in report["weights"].items() if n in reader and torch.equal(v, reader.get(n))]
        assert unmoved == [] and "score.weight" in report["weights"]
        assert not torch.allclose(report["before"].final_logits, report["after"].final_logits)


@pytest.mark.parametrize("layout", ["TP1PP1", "DP2"])
def test_first_step_loss_is_the_exact_global_mean(layout, data, results):
    """BT mean over the step's 2 pairs + 0.5 * BCE mean over its supervised targets, from the
    untrained model's scores (one microbatch per DP rank in DP2, two in TP1)."""
    import torch.nn.functional as F

    _, labelled = data["batches"][0]
    for role in ROLES:
        report = results(layout)[role]
        scores = report["initial_batch_scores"]
        bt = -F.logsigmoid(scores["chosen"] - scores["rejected"]).mean()
        if role == "reward":
            bce = F.binary_cross_entropy_with_logits(scores["labelled_final"], labelled.outcome_targets)
        else:
            mask = labelled.supervised
            bce = F.binary_cross_entropy_with_logits(scores["labelled_steps"][mask], labelled.targets[mask])
        expected = float(bt + 0.5 * bce)
        assert report["steps"][0].loss == pytest.approx(expected, abs=TOLERANCE)


def test_prm_checkpoint_saved_at_pp2_scores_the_same_at_tp1(data, results, rank_pool):
    from megatron_rlhf.data.reward_data import LabelledResponse
    from megatron_rlhf.rewards.sample import RewardSample

    report = results("PP2")
    samples = []
    for index, record in enumerate(data["labelled"]):
        response = record.response if isinstance(record, LabelledResponse) else "\n".join(record.steps)
        samples.append(RewardSample(str(index), "math", record.prompt, response))
    loaded = rank_pool.run(_load_worker, 1, report["checkpoint"], samples)[0]
    after = report["prm"]["after"]
    probabilities = torch.sigmoid(after.boundary_logits)
    for row, result in enumerate(loaded):
        steps = probabilities[row][after.boundary_mask[row]]
        assert result.step_rewards == pytest.approx(steps.tolist(), abs=TOLERANCE)
        assert result.reward == pytest.approx(float(steps.min()), abs=TOLERANCE)
