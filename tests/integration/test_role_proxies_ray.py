"""The typed role proxies on a real local Ray cluster: an actor group at DP2 and a reference
group at DP1 (same weights) give the same log-probs in batch order, and the actor update runs
on the DP shares the proxy hands out.

Checks the Ray side of the dispatch (groups started together, shares put once per replica and
step for every call and role with the same split, handed to that replica's ranks,
results read back from the output ranks only); the per-rank contents and the numerical
equivalence of the update at DP2 and TP2xDP2 are checked in tests/distributed/test_dp_dispatch.py.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.distributed]

VOCAB = 300
SAMPLES, RESPONSE = 8, 6


def _batch():
    from megatron_rlhf.types import RolloutBatch

    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 1, 4, 2, 5, 3, 6, 2])
    mask = (torch.arange(RESPONSE).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return RolloutBatch(prompt_ids=torch.randint(3, VOCAB, (SAMPLES, 4), generator=generator),
                        prompt_lengths=torch.tensor([4, 2, 3, 4, 1, 2, 3, 4]),
                        response_ids=torch.randint(3, VOCAB, (SAMPLES, RESPONSE), generator=generator) * mask.long(),
                        response_mask=mask, sampling_logprobs=torch.zeros(SAMPLES, RESPONSE),
                        finish_reasons=["stop"] * SAMPLES, group_index=torch.arange(SAMPLES) // 2,
                        prompt_index=torch.arange(SAMPLES) // 2, pad_token_id=0)


def test_actor_dp2_and_reference_dp1_agree_through_ray(tmp_path, ray_cluster):
    from dataclasses import replace

    import ray

    from megatron_rlhf.algorithms import AlgorithmConfig, Experience
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer
    from megatron_rlhf.training.megatron_step import OptimizerSettings
    from megatron_rlhf.training.ppo_update import PPOUpdateConfig
    from megatron_rlhf.workers.group import Placement, PlacementPlan, WorkerGroup
    from megatron_rlhf.workers.megatron_worker import ActorWorker, ReferenceWorker, RoleWorkerSpec
    from megatron_rlhf.workers.role_proxies import ActorGroup, ReferenceGroup
    from megatron_rlhf.workers.share_store import ShareStore

    hf_dir = str(make_tiny_hf_model("llama", tmp_path / "llama", seed=5, vocab_size=VOCAB,
                                    tokenizer=train_tiny_tokenizer(VOCAB, seed=0)))
    update = PPOUpdateConfig(num_minibatches=2, micro_batch_size=1)
    spec = RoleWorkerSpec(hf_dir=hf_dir, optimizer=OptimizerSettings(lr=1e-3), update=update,
                          algorithm=AlgorithmConfig(kl_mode="none"))
    placement = Placement(PlacementPlan(bundles=2, cpus_per_bundle=1.0))
    groups = []
    try:  # both groups start and join at once, as the RL run starts them
        groups.append(WorkerGroup("actor", ActorWorker, 2, placement, (spec,), join=False))
        groups.append(WorkerGroup("reference", ReferenceWorker, 1, placement, (spec,), join=False))
        ray.get([ref for group in groups for ref in group.begin_join()])
        shares = ShareStore()
        actor = ActorGroup(groups[0], update.num_minibatches, shares)
        reference = ReferenceGroup(groups[1], shares=shares)
        assert actor.dp_size == 2 and [h.rank for h in actor.holders] == [0, 1]
        batch = replace(_batch(), response_texts=[f"text {row}" for row in range(SAMPLES)])
        shards = actor.shards(batch)
        assert sorted(shards[0] + shards[1]) == list(range(SAMPLES)) and len(shards[0]) == 4
        logprobs, entropy = actor.logprobs_and_entropy(batch)
        expected = reference.logprobs(batch)
        assert logprobs.shape == (SAMPLES, RESPONSE) and entropy.shape == (SAMPLES, RESPONSE)
        assert (logprobs - expected).abs().max().item() <= 1e-5
        mask = batch.response_mask
        experience = Experience(response_mask=mask.bool(), old_logprobs=logprobs,
                                advantages=torch.linspace(-1, 1, SAMPLES).unsqueeze(1) * mask,
                                token_rewards=torch.zeros_like(mask), sequence_scores=torch.zeros(SAMPLES),
                                raw_rewards=torch.zeros(SAMPLES))
        steps = actor.update(batch, experience, 0.0)
        assert len(steps) == 2 and all(not step.skipped for step in steps)
        assert steps[0].terms["ratio_deviation_max"] == 0.0  # old log-probs came back in batch order
        assert shares.puts == 3  # the actor's two shares (log-probs and update) + the reference's one
    finally:
        for group in groups:
            group.shutdown()
        placement.remove()
