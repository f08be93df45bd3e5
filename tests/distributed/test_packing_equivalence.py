"""Packed token-budget microbatches change nothing: same log-probs, values, loss, gradient norm, weights.

In one gloo world of the distributed tier's rank pool, at TP1, TP2, TP2 with sequence parallelism
(packed rows tail-padded to a multiple of 2), PP2 (rows padded to one common length) and DP2
(each DP replica handed its token-balanced share), two real actor workers and two real critic
workers are built from the same Hugging Face directory (the critics' fresh value heads made equal
by copying one into the other): one pair on today's path (right-padded
microbatches of ``micro_batch_size`` samples), the other with ``packing: true`` and a token
budget (``max_tokens_per_microbatch``) that groups the samples differently: packed microbatches
hold 1 or 2 samples and are more numerous than the padded ones.

Checked within 1e-6 (fp32): the actor's log-probs and entropy (the old-policy pass), the
reference path's log-probs (:func:`response_logprobs`, which the reference worker runs), the
critic's values; an on-policy actor update (its loss, gradient norm, weights, and the per-token
log-probs it returns in batch order against the padded old-policy pass), then a two-epoch actor
update and a critic update: every step's loss and gradient norm and every parameter of this
rank's shard afterwards. Also: the
packed path reports a smaller ``padding_fraction`` than the padded one, and 0.0 at TP1 / TP2 /
DP2 where no row needs tail padding.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-6
SAMPLES, PROMPT, RESPONSE = 6, 5, 7
TOKEN_BUDGET = 13
LAYOUTS = {
    "TP1": (ParallelConfig(), 1),
    "TP2": (ParallelConfig(tensor_parallel=2), 1),
    "TP2SP": (ParallelConfig(tensor_parallel=2, sequence_parallel=True), 1),
    "PP2": (ParallelConfig(pipeline_parallel=2), 1),
    "DP2": (ParallelConfig(), 2),
}


def _data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    prompt_lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    prompt_ids = torch.randint(3, VOCAB, (SAMPLES, PROMPT), generator=generator)
    prompt_ids[torch.arange(PROMPT).unsqueeze(0) >= prompt_lengths.unsqueeze(1)] = 0
    response_lengths = torch.tensor([7, 3, 1, 5, 4, 2])
    response_ids = torch.randint(3, VOCAB, (SAMPLES, RESPONSE), generator=generator)
    response_ids[torch.arange(RESPONSE).unsqueeze(0) >= response_lengths.unsqueeze(1)] = 0
    return {"prompt_ids": prompt_ids, "prompt_lengths": prompt_lengths, "response_ids": response_ids,
            "response_lengths": response_lengths,
            "advantages": torch.randn(SAMPLES, RESPONSE, generator=generator),
            "ref_logprobs": -5.7 + 0.3 * torch.randn(SAMPLES, RESPONSE, generator=generator),
            "returns": torch.randn(SAMPLES, RESPONSE, generator=generator),
            "old_values": 0.1 * torch.randn(SAMPLES, RESPONSE, generator=generator)}


def _batch(data: dict[str, torch.Tensor]):
    from megatron_rlhf.types import RolloutBatch

    mask = (torch.arange(RESPONSE).unsqueeze(0) < data["response_lengths"].unsqueeze(1)).float()
    return RolloutBatch(prompt_ids=data["prompt_ids"], prompt_lengths=data["prompt_lengths"],
                        response_ids=data["response_ids"], response_mask=mask,
                        sampling_logprobs=torch.zeros(SAMPLES, RESPONSE), finish_reasons=["stop"] * SAMPLES,
                        group_index=torch.arange(SAMPLES) // 2, prompt_index=torch.arange(SAMPLES) // 2,
                        pad_token_id=0)


def _experience(batch, data, received, old_logprobs: torch.Tensor):
    from megatron_rlhf.algorithms import Experience

    mask = batch.response_mask
    return Experience(response_mask=mask.bool(), old_logprobs=old_logprobs * mask,
                      advantages=data["advantages"][received] * mask,
                      token_rewards=torch.zeros(batch.num_samples, RESPONSE),
                      sequence_scores=torch.zeros(batch.num_samples), raw_rewards=torch.zeros(batch.num_samples),
                      ref_logprobs=data["ref_logprobs"][received] * mask,
                      returns=data["returns"][received] * mask, old_values=data["old_values"][received] * mask)


def _parameters(worker) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in worker.model.named_parameters()}


def _weight_gap(first, second) -> float:
    """Largest |difference| over every parameter of this rank's shard."""
    a, b = _parameters(first), _parameters(second)
    assert sorted(a) == sorted(b)
    return max((a[name] - b[name]).abs().max().item() for name in a)


def _steps(stats) -> list[tuple[float, float, float]]:
    return [(step.loss, step.grad_norm, step.terms["padding_fraction"]) for step in stats]


def _job(parallel: ParallelConfig, hf_dir: str, data: dict[str, torch.Tensor]) -> dict:
    import os

    from megatron_rlhf.algorithms import AlgorithmConfig
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig
    from megatron_rlhf.models.sequence_logprobs import response_logprobs
    from megatron_rlhf.parallel.data_dispatch import balanced_shards, sample_tokens, select_rollout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.workers.megatron_worker import ActorWorker, CriticWorker, RoleWorkerSpec

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    state = initialize_parallel(parallel, seed=1)
    full = _batch(data)
    received = balanced_shards(sample_tokens(full).tolist(), state.data_parallel_size, 1)[state.data_parallel_rank]
    batch = select_rollout(full, received)
    algorithm = AlgorithmConfig(advantage_estimator="gae", kl_mode="loss", kl_estimator="k3", kl_coef=0.1,
                                entropy_coef=0.01)
    padded_plan = PPOUpdateConfig(micro_batch_size=len(received) // 3 or 1)
    packed_plan = PPOUpdateConfig(micro_batch_size=1, packing=True, max_tokens_per_microbatch=TOKEN_BUDGET)

    def spec(update: PPOUpdateConfig) -> RoleWorkerSpec:
        return RoleWorkerSpec(hf_dir=hf_dir, parallel=parallel, algorithm=algorithm, temperature=0.8, seed=1,
                              optimizer=OptimizerSettings(lr=1e-3, adam_eps=1e-3, clip_grad=1.0), update=update)

    report: dict = {"received": received, "dp_rank": state.data_parallel_rank, "rank": rank}
    actors = {name: ActorWorker(rank, world_size, spec(plan)) for name, plan in
              (("padded", padded_plan), ("packed", packed_plan))}
    for actor in actors.values():
        actor.load_model(state)
    passes = {name: actor.trainer.logprobs_and_entropy(batch) for name, actor in actors.items()}
    report["logprobs_gap"] = (passes["padded"][0] - passes["packed"][0]).abs().max().item()
    report["entropy_gap"] = (passes["padded"][1] - passes["packed"][1]).abs().max().item()
    reference = {name: response_logprobs(actor.model, batch, actor.valid_vocab_size, 0.8, plan.micro_batch_size,
                                         plan.packing, plan.max_tokens_per_microbatch)
                 for (name, actor), plan in zip(actors.items(), (padded_plan, packed_plan))}
    report["reference_gap"] = (reference["padded"] - reference["packed"]).abs().max().item()
    experience = _experience(batch, data, received, passes["padded"][0])
    on_policy = {name: actor.trainer.update_on_policy(batch, experience, 0.1) for name, actor in actors.items()}
    report["on_policy_steps"] = {name: _steps(held.stats) for name, held in on_policy.items()}
    report["on_policy_logprobs_gap"] = (passes["padded"][0] - on_policy["packed"].logprobs).abs().max().item()
    report["on_policy_logprobs_nonzero"] = bool((on_policy["packed"].logprobs[batch.response_mask.bool()] < 0).all())
    report["on_policy_weight_gap"] = _weight_gap(actors["padded"], actors["packed"])
    report["actor_steps"] = {name: _steps(actor.trainer.update(batch, experience, 0.1,
                                                               replace(actor.trainer.update_config, ppo_epochs=2)))
                             for name, actor in actors.items()}
    report["actor_weight_gap"] = _weight_gap(actors["padded"], actors["packed"])

    critics = {name: CriticWorker(rank, world_size, spec(plan)) for name, plan in
               (("padded", padded_plan), ("packed", packed_plan))}
    for critic in critics.values():
        critic.load_model(state)
    with torch.no_grad():  # the value head starts fresh, from a different draw per build: share it
        for target, source in zip(critics["packed"].model.parameters(), critics["padded"].model.parameters()):
            target.copy_(source)
    report["critic_initial_gap"] = _weight_gap(critics["padded"], critics["packed"])
    values = {name: critic.trainer.values(batch) for name, critic in critics.items()}
    report["values_gap"] = (values["padded"] - values["packed"]).abs().max().item()
    report["critic_steps"] = {name: _steps(critic.trainer.update(batch, experience)) for name, critic in critics.items()}
    report["critic_weight_gap"] = _weight_gap(critics["padded"], critics["packed"])
    return report


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    root = tmp_path_factory.mktemp("packing_equivalence")
    return str(make_tiny_hf_model("llama", root / "llama", seed=7, vocab_size=VOCAB, tokenizer=tokenizer))


@pytest.fixture(scope="module")
def results(hf_dir, rank_pool):
    cache: dict[str, list[dict]] = {}

    def run(layout: str) -> list[dict]:
        if layout not in cache:
            parallel, data_parallel = LAYOUTS[layout]
            cache[layout] = rank_pool.run(_job, parallel.world_size(data_parallel), parallel, hf_dir, _data())
        return cache[layout]

    return run


def _assert_same_steps(padded: list, packed: list) -> None:
    assert len(padded) == len(packed) >= 1
    for (loss, grad_norm, _), (packed_loss, packed_grad_norm, _) in zip(padded, packed):
        assert abs(loss - packed_loss) <= TOLERANCE, (loss, packed_loss)
        assert abs(grad_norm - packed_grad_norm) <= TOLERANCE * max(1.0, grad_norm), (grad_norm, packed_grad_norm)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_passes_give_the_padded_logprobs_and_values(layout, results):
    for report in results(layout):
        for name in ("logprobs_gap", "entropy_gap", "reference_gap", "values_gap"):
            assert report[name] <= TOLERANCE, (name, report[name])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_updates_give_the_same_loss_grad_norm_and_weights(layout, results):
    for report in results(layout):
        assert report["critic_initial_gap"] == 0.0
        for steps in ("actor_steps", "on_policy_steps", "critic_steps"):
            _assert_same_steps(report[steps]["padded"], report[steps]["packed"])
        for name in ("actor_weight_gap", "on_policy_weight_gap", "critic_weight_gap", "on_policy_logprobs_gap"):
            assert report[name] <= TOLERANCE, (name, report[name])
        assert report["on_policy_logprobs_nonzero"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packing_reports_less_padding(layout, results):
    report = results(layout)[0]
    (_, _, padded), (_, _, packed) = report["actor_steps"]["padded"][0], report["actor_steps"]["packed"][0]
    assert 0.0 < padded < 1.0
    assert 0.0 <= packed < padded
    if layout in ("TP1", "TP2", "DP2"):
        assert packed == 0.0


HEADS, GROUPS, HEAD_DIM = 4, 2, 8
SEGMENT_CASES = {"short": (5, 1, 7, 3),  # one SDPA call (one group)
                 "mixed": (100, 5, 90, 1, 64, 70)}  # two calls: {100, 90, 70} and {64, 5, 1}


def _attention_job(segments: tuple[int, ...]) -> dict:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_rlhf.models.sdpa_attention import SDPACoreAttention
    from megatron_rlhf.parallel.init import initialize_parallel

    initialize_parallel(ParallelConfig(), seed=1)
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HEAD_DIM, use_cpu_initialization=True)
    attention = SDPACoreAttention(config, 1, AttnMaskType.causal, "self").eval()
    generator = torch.Generator().manual_seed(2)
    total = sum(segments)
    inputs = {"query": torch.randn(total, HEADS, HEAD_DIM, generator=generator),
              "key": torch.randn(total, GROUPS, HEAD_DIM, generator=generator),
              "value": torch.randn(total, GROUPS, HEAD_DIM, generator=generator)}
    upstream = torch.randn(total, HEADS * HEAD_DIM, generator=generator)
    cu_seqlens = torch.tensor((0,) + segments).cumsum(0).to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=max(segments), max_seqlen_kv=max(segments))
    packed_leaves = {name: tensor.clone().requires_grad_(True) for name, tensor in inputs.items()}
    packed = attention(packed_leaves["query"], packed_leaves["key"], packed_leaves["value"], None,
                       packed_seq_params=params)
    packed.backward(upstream)
    alone_leaves = {name: tensor.clone().requires_grad_(True) for name, tensor in inputs.items()}
    bounds = cu_seqlens.tolist()
    alone = torch.cat([attention(*(alone_leaves[name][start:end].unsqueeze(1) for name in ("query", "key", "value")),
                                 None)[:, 0] for start, end in zip(bounds[:-1], bounds[1:])])
    alone.backward(upstream)
    report = {"shape": tuple(packed.shape),
              "output_gap": (packed - alone).abs().max().item(),
              "grad_gap": max((packed_leaves[name].grad - alone_leaves[name].grad).abs().max().item()
                              for name in inputs)}
    try:
        attention(inputs["query"], inputs["key"], inputs["value"], torch.zeros(1, 1, total, total, dtype=torch.bool),
                  packed_seq_params=params)
        report["mask_refusal"] = ""
    except ValueError as error:
        report["mask_refusal"] = str(error)
    return report


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_sdpa_packed_attention_is_each_sequence_attending_alone(rank_pool, case):
    """Core attention on a thd pack (GQA; short segments batched in one call, or long and short
    ones in two right-padded calls) equals each sequence run alone through the ordinary causal
    path: output [t, heads * d] and q/k/v gradients within 1e-6; an attention mask with thd is
    refused by name."""
    segments = SEGMENT_CASES[case]
    (report,) = rank_pool.run(_attention_job, 1, segments)
    assert report["shape"] == (sum(segments), HEADS * HEAD_DIM)
    assert report["output_gap"] <= TOLERANCE and report["grad_gap"] <= TOLERANCE, report
    assert "take no attention_mask" in report["mask_refusal"]
