"""Packed reward-model training steps give the padded path's losses and weights (ORM and PRM).

At TP1, TP2 (sequence parallel: packed rows tail-padded to a multiple of 2), PP2 (rows padded to
one common length) and DP2, for each role (``reward``: Bradley-Terry + outcome BCE at the final
token; ``prm``: Bradley-Terry at the final token + BCE at every step boundary) two copies of the
same tiny llama (the same fresh head weights copied into both) take 2 optimizer steps on the same
mixed global batches (2 preference pairs and 4 labelled / step-labelled responses of unequal
lengths per step, 2 microbatches of 1 pair + 2 responses): one right-padded, one with
``packing: true``. Checked within 1e-6 (fp32): every step's loss, its terms and gradient norm,
and every parameter of this rank's shard afterwards; the packed steps report a smaller
``padding_fraction``.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-6
STEPS = 2
ROLES = ("reward", "prm")
LAYOUTS = {
    "TP1": (ParallelConfig(), 1),
    "TP2": (ParallelConfig(tensor_parallel=2, sequence_parallel=True), 1),
    "PP2": (ParallelConfig(pipeline_parallel=2), 1),
    "DP2": (ParallelConfig(), 2),
}


def _records(seed: int, count: int):
    from megatron_rlhf.data.reward_data import LabelledResponse, PreferencePair, StepLabelledResponse

    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(["alpha", "beta", "7", "x", "sum", "is"]) for _ in range(words))

    pairs = [PreferencePair(text(rng.randint(1, 4)), text(rng.randint(1, 6)), text(rng.randint(1, 9)))
             for _ in range(count)]
    labelled = []
    for index in range(2 * count):
        prompt = text(rng.randint(1, 5))
        if index % 2:
            labelled.append(LabelledResponse(prompt, "\n".join(text(2) for _ in range(rng.randint(1, 3))),
                                             rng.randint(0, 1)))
        else:
            steps = tuple(text(rng.randint(1, 3)) for _ in range(rng.randint(1, 4)))
            labelled.append(StepLabelledResponse(prompt, steps, tuple(round(rng.random(), 2) for _ in steps),
                                                 label=rng.choice([None, 0, 1])))
    return pairs, labelled


def _batches(hf_dir: str):
    import transformers

    from megatron_rlhf.data.reward_data import (
        RewardTokenization,
        collate_labelled,
        collate_pairs,
        tokenize_labelled,
        tokenize_response,
    )

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tokenization = RewardTokenization(prompt_format="chat")
    pairs, labelled = _records(seed=3, count=2 * STEPS)
    pad = tokenizer.pad_token_id
    tokenized_pairs = [(tokenize_response(tokenizer, p.prompt, p.chosen, tokenization),
                        tokenize_response(tokenizer, p.prompt, p.rejected, tokenization)) for p in pairs]
    tokenized_labelled = [tokenize_labelled(tokenizer, record, tokenization) for record in labelled]
    return [(collate_pairs(tokenized_pairs[2 * s: 2 * s + 2], pad),
             collate_labelled(tokenized_labelled[4 * s: 4 * s + 4], pad)) for s in range(STEPS)]


def _job(parallel: ParallelConfig, hf_dir: str) -> dict:
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.trainer.reward_model import RewardModelTrainer, RewardTrainingConfig
    from megatron_rlhf.training.megatron_step import OptimizerSettings

    initialize_parallel(parallel, seed=1)
    arch = arch_spec_from_hf_dir(hf_dir)
    batches = _batches(hf_dir)
    score = torch.randn(1, 64, generator=torch.Generator().manual_seed(7)) * 0.1
    report = {}
    for role in ROLES:
        steps, parameters = {}, {}
        for packing in (False, True):
            build = ModelBuildConfig(role=role, transformer_impl="local")
            model = build_stage_model(arch, parallel, build)
            load_hf_weights(model, HFWeightReader(hf_dir), arch, role, validate_layout(arch, parallel, build))
            if model.head is not None:
                with torch.no_grad():
                    model.head.score.weight.copy_(score)
            config = RewardTrainingConfig(pairs_per_microbatch=1, responses_per_microbatch=2, microbatches_per_step=2,
                                          classification_weight=0.5, packing=packing)
            trainer = RewardModelTrainer(model, OptimizerSettings(lr=1e-3, adam_eps=1e-3, clip_grad=1.0), config)
            steps[packing] = [trainer.train_step(pairs, labelled) for pairs, labelled in batches]
            parameters[packing] = {name: value.detach().clone() for name, value in model.named_parameters()}
        report[role] = {"padded": steps[False], "packed": steps[True],
                        "weight_gap": max((parameters[False][name] - parameters[True][name]).abs().max().item()
                                          for name in parameters[False])}
    return report


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    root = tmp_path_factory.mktemp("reward_packing")
    return str(make_tiny_hf_model("llama", root / "llama", seed=11, vocab_size=VOCAB, tokenizer=tokenizer,
                                  hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, head_dim=32, intermediate_size=128))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_reward_model_steps_give_the_padded_losses_and_weights(layout, hf_dir, rank_pool):
    parallel, data_parallel = LAYOUTS[layout]
    for rank in rank_pool.run(_job, parallel.world_size(data_parallel), parallel, hf_dir):
        for role in ROLES:
            padded, packed = rank[role]["padded"], rank[role]["packed"]
            assert len(padded) == len(packed) == STEPS
            for before, after in zip(padded, packed):
                assert not before.skipped and not after.skipped
                for name in ("loss", "preference_loss", "classification_loss", "pair_accuracy"):
                    assert abs(getattr(before, name) - getattr(after, name)) <= TOLERANCE, (role, name)
                assert abs(before.grad_norm - after.grad_norm) <= TOLERANCE * max(1.0, before.grad_norm)
                assert 0.0 <= after.padding_fraction < before.padding_fraction
            assert rank[role]["weight_gap"] <= TOLERANCE, (role, rank[role]["weight_gap"])
