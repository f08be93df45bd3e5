"""Actor and reference take one log-prob path: with the same weights, KL at step 0 is exactly 0.

The real :class:`~megatron_rlhf.workers.megatron_worker.ActorWorker` and
:class:`~megatron_rlhf.workers.megatron_worker.ReferenceWorker` are built from the same Hugging
Face directory and spec, in one gloo world of the distributed tier's rank pool (TP1, and TP2
where the vocabulary is split and the log-softmax all-reduces), each through its own
``load_model``. On a batch with unequal prompt and response lengths, a share that does not fill
the last microbatch, a sample whose response mask was cleared (an infrastructure-error reward,
as :func:`~megatron_rlhf.trainer.rl_step.rl_step` does) and a temperature other than 1, the
actor's old log-probs (taken with the entropy, as the RL step takes them) and the reference's
log-probs must be bitwise equal, and so the KL the experience is made with must be exactly 0
on every token. Any divergence of the two paths (temperature, vocabulary masking, padding,
gather, dtype, the all-reduce) fails here.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
SAMPLES, PROMPT, RESPONSE = 5, 6, 7
TEMPERATURE = 0.7
LAYOUTS = {"TP1": ParallelConfig(), "TP2": ParallelConfig(tensor_parallel=2)}


def _batch():
    from megatron_rlhf.types import RolloutBatch

    generator = torch.Generator().manual_seed(11)
    prompt_lengths = torch.tensor([6, 2, 4, 1, 5])
    prompt_ids = torch.randint(3, VOCAB, (SAMPLES, PROMPT), generator=generator)
    prompt_ids[torch.arange(PROMPT).unsqueeze(0) >= prompt_lengths.unsqueeze(1)] = 0
    response_lengths = torch.tensor([7, 3, 1, 5, 4])
    response_ids = torch.randint(3, VOCAB, (SAMPLES, RESPONSE), generator=generator)
    mask = (torch.arange(RESPONSE).unsqueeze(0) < response_lengths.unsqueeze(1)).float()
    response_ids[mask == 0] = 0
    mask[3] = 0.0  # an infrastructure-error sample: the RL step clears its mask
    return RolloutBatch(prompt_ids=prompt_ids, prompt_lengths=prompt_lengths, response_ids=response_ids,
                        response_mask=mask, sampling_logprobs=torch.zeros(SAMPLES, RESPONSE),
                        finish_reasons=["stop"] * SAMPLES, group_index=torch.tensor([0, 0, 1, 1, 2]),
                        prompt_index=torch.tensor([0, 0, 1, 1, 2]), pad_token_id=0)


def _rank(layout: str, hf_dir: str) -> dict:
    import os

    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.workers.megatron_worker import ActorWorker, ReferenceWorker, RoleWorkerSpec

    parallel = LAYOUTS[layout]
    spec = RoleWorkerSpec(hf_dir=hf_dir, parallel=parallel, optimizer=OptimizerSettings(lr=1e-3),
                          update=PPOUpdateConfig(micro_batch_size=2), temperature=TEMPERATURE, seed=1)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    state = initialize_parallel(parallel, seed=spec.seed)
    actor, reference = ActorWorker(rank, world_size, spec), ReferenceWorker(rank, world_size, spec)
    actor.load_model(state)
    reference.load_model(state)
    batch = _batch()
    held = actor.logprobs_and_entropy(batch)
    return {"holds": actor.rank_layout().holds_output, "actor": held,
            "reference": reference.logprobs(batch), "valid_vocab_size": actor.valid_vocab_size,
            "padded_vocab": actor.padded_vocab}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    root = tmp_path_factory.mktemp("reference_matches_actor")
    return str(make_tiny_hf_model("llama", root / "llama", seed=5, vocab_size=VOCAB, tokenizer=tokenizer))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_logprobs_equal_the_actors_bitwise_and_kl_is_zero(layout, hf_dir, rank_pool):
    from megatron_rlhf.algorithms import AlgorithmConfig, Rollout, make_experience

    ranks = rank_pool.run(_rank, LAYOUTS[layout].world_size(1), layout, hf_dir)
    holder = next(report for report in ranks if report["holds"])
    assert holder["padded_vocab"] > holder["valid_vocab_size"]  # the padded rows are masked out
    assert all(report["actor"] is None and report["reference"] is None for report in ranks if not report["holds"])
    old_logprobs, entropy = holder["actor"]
    ref_logprobs = holder["reference"]
    batch = _batch()
    mask = batch.response_mask.bool()
    assert old_logprobs.dtype == ref_logprobs.dtype == torch.float32
    assert torch.isfinite(old_logprobs).all() and (old_logprobs[mask] < 0).all() and (entropy[mask] > 0).all()
    assert torch.equal(old_logprobs, ref_logprobs)

    algorithm = AlgorithmConfig(advantage_estimator="grpo", kl_mode="penalty", kl_estimator="k1")
    rollout = Rollout(rewards=torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0]), response_mask=batch.response_mask,
                      old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, group_index=batch.group_index)
    experience, _ = make_experience(rollout, algorithm, kl_coef=0.1)
    assert experience.kl is not None and torch.count_nonzero(experience.kl) == 0
