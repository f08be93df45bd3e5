"""The PPO actor and critic updates give the same losses and weights under TP2, PP2, DP2, TP2xPP2.

One synthetic rollout (8 samples, prompts of 2..6 and responses of 1..8 tokens, right padded) on a
tiny llama (vocab 300). In every layout the worker computes the actor's log-probs and the
critic's values itself, makes old log-probs / old values from them plus the same fixed noise,
and runs 2 PPO epochs x 2 minibatches (4 optimizer steps) of the actor (PPO clip, k3 KL loss,
entropy bonus) and of the critic (clipped value loss), with Megatron's distributed Adam,
gradient clipping and microbatches of 2 full sequences. Checked against TP1 PP1 within 1e-5
(fp32): the loss of every optimizer step and every exported updated tensor. The token-mean
normalisation is exercised because DP2 sees 1 microbatch per step and the others 2, with
unequal token counts. At DP2 each rank is handed only its replica's share of the rollout (the
token-balanced split the role proxies make, 2 minibatches), computes log-probs and values of
that share only, and the per-rank results are reassembled in batch order before comparing.

Also: with old log-probs taken from the same weights, the first step's ratio is exactly 1 (no
clipping); a batch with a NaN advantage is skipped on every rank, counted, and changes no weight.

Optimizer: Adam with adam_eps=1e-3, for the reason documented in test_train_step_layouts.py
(fp32 reduction-order noise on near-cancelling gradients is amplified by a tiny eps).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-5
SAMPLES, PROMPT, RESPONSE = 8, 6, 8
LAYOUTS = {
    "TP1PP1": (ParallelConfig(), 1),
    "TP2": (ParallelConfig(tensor_parallel=2), 1),
    "PP2": (ParallelConfig(pipeline_parallel=2), 1),
    "DP2": (ParallelConfig(), 2),
    "TP2PP2": (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 1),
}


def _rollout(data: dict[str, torch.Tensor]):
    from megatron_rlhf.types import RolloutBatch

    mask = (torch.arange(RESPONSE).unsqueeze(0) < data["response_lengths"].unsqueeze(1)).float()
    return RolloutBatch(
        prompt_ids=data["prompt_ids"],
        prompt_lengths=data["prompt_lengths"],
        response_ids=data["response_ids"],
        response_mask=mask,
        sampling_logprobs=torch.zeros(SAMPLES, RESPONSE),
        finish_reasons=["stop"] * SAMPLES,
        group_index=torch.arange(SAMPLES) // 2,
        prompt_index=torch.arange(SAMPLES) // 2,
        pad_token_id=0,
    )


def _experience(batch, data, logprobs: torch.Tensor, values: torch.Tensor):
    from megatron_rlhf.algorithms import Experience

    mask = batch.response_mask
    zeros = torch.zeros(batch.num_samples, RESPONSE)
    return Experience(
        response_mask=mask.bool(),
        old_logprobs=(logprobs + data["logprob_noise"]) * mask,
        advantages=data["advantages"] * mask,
        token_rewards=zeros,
        sequence_scores=torch.zeros(batch.num_samples),
        raw_rewards=torch.zeros(batch.num_samples),
        ref_logprobs=(logprobs + data["ref_noise"]) * mask,
        returns=(values + data["returns_offset"]) * mask,
        old_values=(values + data["value_noise"]) * mask,
    )


def _snapshot(exported) -> dict[str, torch.Tensor]:
    """Copies: an exported tensor that needs no gathering may share storage with a parameter,
    so later updates would change it."""
    return {name: tensor.detach().clone() for name, tensor in dict(exported).items()}


def _worker(parallel: ParallelConfig, hf_dir: str, data: dict[str, torch.Tensor]):
    from megatron_rlhf.algorithms import AlgorithmConfig
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import export_hf_weights, load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import (
        ModelBuildConfig,
        build_stage_model,
        validate_layout,
    )
    from megatron_rlhf.parallel.data_dispatch import balanced_shards, sample_tokens, select_rollout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.training.actor_critic import (
        ActorTrainer,
        CriticTrainer,
        PPOUpdateConfig,
    )
    from megatron_rlhf.training.megatron_step import OptimizerSettings

    state = initialize_parallel(parallel, seed=1)
    arch = arch_spec_from_hf_dir(hf_dir)
    reader = HFWeightReader(hf_dir)
    settings = OptimizerSettings(lr=1e-3, adam_eps=1e-3, clip_grad=1.0)
    algorithm = AlgorithmConfig(kl_mode="loss", kl_estimator="k3", entropy_coef=0.01, value_clip=0.2)
    update = PPOUpdateConfig(ppo_epochs=2, num_minibatches=2, micro_batch_size=2)
    one_step = PPOUpdateConfig(ppo_epochs=1, num_minibatches=1, micro_batch_size=2)
    full = _rollout(data)
    # this DP replica's share, as the role proxies hand it (TP/PP peers get the same one)
    received = balanced_shards(sample_tokens(full).tolist(), state.data_parallel_size, 2)[state.data_parallel_rank]
    batch = select_rollout(full, received)
    data = {name: value[received] if value.shape[:1] == (SAMPLES,) else value for name, value in data.items()}

    def build(role: str):
        config = ModelBuildConfig(role=role, transformer_impl="local")
        model = build_stage_model(arch, parallel, config)
        load_hf_weights(model, reader, arch, role, validate_layout(arch, parallel, config))
        if model.head is not None:
            with torch.no_grad():
                model.head.score.weight.copy_(data["score"])
        return model

    actor_model, critic_model = build("lm"), build("value")
    actor = ActorTrainer(actor_model, settings, algorithm, update, valid_vocab_size=VOCAB)
    critic = CriticTrainer(critic_model, settings, algorithm, update)
    logprobs, values = actor.logprobs(batch), critic.values(batch)
    experience = _experience(batch, data, logprobs, values)
    report = {
        "received": received,
        "dp_rank": state.data_parallel_rank,
        "holds": state.tensor_parallel_rank == 0 and state.is_last_stage,
        "logprobs": logprobs,
        "values": values,
        "actor_steps": actor.update(batch, experience),
        "critic_steps": critic.update(batch, experience),
    }
    actor_weights = _snapshot(export_hf_weights(actor_model, arch, "lm"))
    critic_weights = _snapshot(export_hf_weights(critic_model, arch, "value"))

    same_policy = replace(experience, old_logprobs=actor.logprobs(batch))
    report["same_policy_step"] = actor.update(batch, same_policy, config=one_step)[0]
    before = _snapshot(export_hf_weights(actor_model, arch, "lm"))
    poisoned = experience.advantages.clone()
    if 5 in received:  # a response token of sample 5, on the replica that holds it
        poisoned[received.index(5), 0] = float("nan")
    report["nan_step"] = actor.update(batch, replace(experience, advantages=poisoned), config=one_step)[0]
    after = _snapshot(export_hf_weights(actor_model, arch, "lm"))
    report["nan_changed"] = [name for name in before if not torch.equal(before[name], after[name])]
    report["skipped_steps"] = actor.skipped_steps
    first = state.rank == 0
    report["actor_weights"] = actor_weights if first else None
    report["critic_weights"] = critic_weights if first else None
    return report


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    root = tmp_path_factory.mktemp("actor_critic")
    return str(make_tiny_hf_model("llama", root / "llama", seed=11, vocab_size=VOCAB, tokenizer=tokenizer))


@pytest.fixture(scope="module")
def rollout_data(hf_dir):
    return _make_rollout_data(hf_dir)


def _make_rollout_data(hf_dir: str) -> dict[str, torch.Tensor]:
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir

    generator = torch.Generator().manual_seed(7)
    prompt_lengths = torch.randint(2, PROMPT + 1, (SAMPLES,), generator=generator)
    prompt_ids = torch.randint(3, VOCAB, (SAMPLES, PROMPT), generator=generator)
    prompt_ids[torch.arange(PROMPT).unsqueeze(0) >= prompt_lengths.unsqueeze(1)] = 0
    response_lengths = torch.randint(1, RESPONSE + 1, (SAMPLES,), generator=generator)
    response_lengths[0] = RESPONSE
    response_ids = torch.randint(3, VOCAB, (SAMPLES, RESPONSE), generator=generator)
    response_ids[torch.arange(RESPONSE).unsqueeze(0) >= response_lengths.unsqueeze(1)] = 0
    hidden = arch_spec_from_hf_dir(hf_dir).hidden_size

    def noise(scale: float) -> torch.Tensor:
        return torch.randn(SAMPLES, RESPONSE, generator=generator) * scale

    return {
        "prompt_ids": prompt_ids,
        "prompt_lengths": prompt_lengths,
        "response_ids": response_ids,
        "response_lengths": response_lengths,
        "logprob_noise": noise(0.2),
        "ref_noise": noise(0.1),
        "advantages": noise(1.0),
        "returns_offset": noise(0.5),
        "value_noise": noise(0.3),
        "score": torch.randn(1, hidden, generator=generator) * 0.1,
    }


@pytest.fixture(scope="module")
def results(hf_dir, rollout_data, rank_pool):
    cache: dict[str, dict] = {}

    def run(layout: str) -> dict:
        if layout not in cache:
            parallel, data_parallel = LAYOUTS[layout]
            per_rank = rank_pool.run(
                _worker,
                parallel.world_size(data_parallel),
                parallel,
                hf_dir,
                rollout_data,
            )
            cache[layout] = {"ranks": per_rank, **per_rank[0], **_reassembled(per_rank)}
        return cache[layout]

    return run


def _reassembled(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """Log-probs and values in batch order from one output rank per DP replica."""
    from megatron_rlhf.parallel.data_dispatch import reassemble

    holders = {report["dp_rank"]: report for report in per_rank if report["holds"]}
    replicas = [holders[dp] for dp in sorted(holders)]
    assert sorted(sum((report["received"] for report in replicas), [])) == list(range(SAMPLES))
    shards = [report["received"] for report in replicas]
    return {name: reassemble([report[name] for report in replicas], shards) for name in ("logprobs", "values")}


def _worst(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert sorted(actual) == sorted(expected)
    return max((actual[name] - expected[name]).abs().max().item() for name in expected)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "TP1PP1"])
@pytest.mark.parametrize("role", ["actor", "critic"])
def test_step_losses_match_tp1pp1(role, layout, results):
    expected = [step.loss for step in results("TP1PP1")[f"{role}_steps"]]
    for report in results(layout)["ranks"]:
        actual = [step.loss for step in report[f"{role}_steps"]]
        assert len(actual) == 4
        assert actual == pytest.approx(expected, abs=TOLERANCE), f"{role} {layout}: {actual} vs {expected}"


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "TP1PP1"])
@pytest.mark.parametrize("role", ["actor", "critic"])
def test_updated_weights_match_tp1pp1(role, layout, results):
    worst = _worst(results(layout)[f"{role}_weights"], results("TP1PP1")[f"{role}_weights"])
    assert worst <= TOLERANCE, f"{role} {layout}: max weight difference {worst:.3e}"


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "TP1PP1"])
def test_logprobs_and_values_match_tp1pp1(layout, results):
    for name in ("logprobs", "values"):
        worst = (results(layout)[name] - results("TP1PP1")[name]).abs().max().item()
        assert worst <= TOLERANCE, f"{name} {layout}: max difference {worst:.3e}"


def test_every_tensor_moved_and_clipping_happened(hf_dir, results):
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader

    reader = HFWeightReader(hf_dir)
    report = results("TP1PP1")
    unmoved = [
        name for name, value in report["actor_weights"].items() if torch.equal(value, reader.get(name))
    ]
    assert unmoved == []
    assert "score.weight" in report["critic_weights"]
    assert any(step.terms["clip_fraction"] > 0 for step in report["actor_steps"])
    assert all(not step.skipped for step in report["actor_steps"] + report["critic_steps"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ratio_is_one_when_old_logprobs_come_from_the_same_weights(layout, results):
    for report in results(layout)["ranks"]:
        step = report["same_policy_step"]
        assert step.terms["ratio_deviation_max"] == 0.0, f"{layout}: ratio deviates from 1"
        assert step.terms["clip_fraction"] == 0.0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nan_advantage_step_is_skipped_counted_and_changes_nothing(layout, results):
    for report in results(layout)["ranks"]:
        assert report["nan_step"].skipped
        assert report["skipped_steps"] == 1
        assert report["nan_changed"] == []


def test_first_step_loss_is_the_exact_minibatch_token_mean(rollout_data, results):
    """Microbatch losses combine into the token mean over the whole first minibatch (4 samples of
    unequal lengths), not a mean of microbatch means: checked against the pure loss functions."""
    from megatron_rlhf.algorithms import AlgorithmConfig, actor_loss, critic_loss

    algorithm = AlgorithmConfig(kl_mode="loss", kl_estimator="k3", entropy_coef=0.01, value_clip=0.2)
    for layout in ("TP1PP1", "DP2"):
        report = results(layout)
        batch = _rollout(rollout_data)
        experience = _experience(batch, rollout_data, report["logprobs"], report["values"])
        first = experience.select(slice(0, SAMPLES // 2))
        logprobs = report["logprobs"][: SAMPLES // 2]
        expected_actor = actor_loss(algorithm, first, logprobs, entropy=torch.zeros_like(logprobs))
        expected_critic = critic_loss(algorithm, first, report["values"][: SAMPLES // 2]).loss
        actor_step, critic_step = report["actor_steps"][0], report["critic_steps"][0]
        assert actor_step.terms["policy_loss"] == pytest.approx(
            float(expected_actor.policy_loss), abs=TOLERANCE
        )
        assert actor_step.terms["kl_loss"] == pytest.approx(float(expected_actor.kl_loss), abs=TOLERANCE)
        assert critic_step.loss == pytest.approx(float(expected_critic), abs=TOLERANCE)
