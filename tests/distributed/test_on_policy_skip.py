"""The on-policy skip of the old-policy pass changes nothing: same loss, gradient norm and weights.

Two real :class:`~megatron_rlhf.workers.megatron_worker.ActorWorker` s are built from the same Hugging
Face directory and spec (one epoch, one minibatch: an on-policy plan), in one gloo world of the
distributed tier's rank pool, at TP1, TP2, PP2 and DP2 (each DP replica handed only its
token-balanced share, as the role proxies hand it). One takes today's path (the old-policy pass,
then :meth:`ActorTrainer.update`); the other skips the pass and calls
:meth:`ActorWorker.update_on_policy` with a placeholder (zero) old log-prob tensor, so it cannot
have read them. The algorithm uses the parts of the loss that read the old log-probs: a KL loss
(k3) against fixed reference log-probs and truncated importance sampling (token level) against
fixed engine log-probs, with a threshold that truncates; once without an entropy bonus (the
entropy is then a detached metric) and once with one (entropy with gradient).

Checked within 1e-6 (fp32): the step's loss, gradient norm and every updated weight; the log-probs
and entropy the skipping update returns (in batch order) against the old-policy pass's. Also: the
skipping update refuses, naming the reason and changing no weight, when the plan is off-policy
(ppo_epochs 2, num_minibatches 2) or the algorithm puts a KL penalty into the rewards.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-6
SAMPLES, PROMPT, RESPONSE = 6, 5, 6
LAYOUTS = {
    "TP1": (ParallelConfig(), 1),
    "TP2": (ParallelConfig(tensor_parallel=2), 1),
    "PP2": (ParallelConfig(pipeline_parallel=2), 1),
    "DP2": (ParallelConfig(), 2),
}
ENTROPY_COEFS = (0.0, 0.01)


def _data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    prompt_lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    prompt_ids = torch.randint(3, VOCAB, (SAMPLES, PROMPT), generator=generator)
    prompt_ids[torch.arange(PROMPT).unsqueeze(0) >= prompt_lengths.unsqueeze(1)] = 0
    response_lengths = torch.tensor([6, 3, 1, 5, 4, 2])
    response_ids = torch.randint(3, VOCAB, (SAMPLES, RESPONSE), generator=generator)
    response_ids[torch.arange(RESPONSE).unsqueeze(0) >= response_lengths.unsqueeze(1)] = 0

    def noise(scale: float) -> torch.Tensor:
        return torch.randn(SAMPLES, RESPONSE, generator=generator) * scale

    return {"prompt_ids": prompt_ids, "prompt_lengths": prompt_lengths, "response_ids": response_ids,
            "response_lengths": response_lengths, "advantages": noise(1.0),
            "ref_logprobs": -5.7 + noise(0.3), "engine_logprobs": -5.7 + noise(0.3)}


def _batch(data: dict[str, torch.Tensor]):
    from megatron_rlhf.types import RolloutBatch

    mask = (torch.arange(RESPONSE).unsqueeze(0) < data["response_lengths"].unsqueeze(1)).float()
    return RolloutBatch(prompt_ids=data["prompt_ids"], prompt_lengths=data["prompt_lengths"],
                        response_ids=data["response_ids"], response_mask=mask,
                        sampling_logprobs=data["engine_logprobs"] * mask, finish_reasons=["stop"] * SAMPLES,
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
                      rollout_logprobs=batch.sampling_logprobs)


def _algorithm(entropy_coef: float, kl_mode: str = "loss"):
    from megatron_rlhf.algorithms import AlgorithmConfig

    return AlgorithmConfig(advantage_estimator="grpo", kl_mode=kl_mode, kl_estimator="k3", kl_coef=0.1,
                           entropy_coef=entropy_coef, rollout_is="token", rollout_is_threshold=1.2)


def _weights(worker) -> dict[str, torch.Tensor]:
    from megatron_rlhf.mapping.engine import export_hf_weights

    return {name: tensor.detach().clone() for name, tensor in dict(export_hf_weights(worker.model, worker.arch, "lm")).items()}


def _job(parallel: ParallelConfig, hf_dir: str, data: dict[str, torch.Tensor]) -> dict:
    import os

    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig
    from megatron_rlhf.parallel.data_dispatch import balanced_shards, sample_tokens, select_rollout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.workers.megatron_worker import ActorWorker, RoleWorkerSpec

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    state = initialize_parallel(parallel, seed=1)
    full = _batch(data)
    received = balanced_shards(sample_tokens(full).tolist(), state.data_parallel_size, 1)[state.data_parallel_rank]
    batch = select_rollout(full, received)
    report: dict = {"received": received, "dp_rank": state.data_parallel_rank, "rank": rank}
    for coef in ENTROPY_COEFS:
        algorithm = _algorithm(coef)
        spec = RoleWorkerSpec(hf_dir=hf_dir, parallel=parallel, algorithm=algorithm, temperature=0.8, seed=1,
                              optimizer=OptimizerSettings(lr=1e-3, adam_eps=1e-3, clip_grad=1.0),
                              update=PPOUpdateConfig(micro_batch_size=3))
        plain, skipping = ActorWorker(rank, world_size, spec), ActorWorker(rank, world_size, spec)
        plain.load_model(state)
        skipping.load_model(state)
        assert plain.old_logprob_pass_reason(algorithm) is None
        old_logprobs, entropy = plain.trainer.logprobs_and_entropy(batch)
        plain_stats = plain.update(batch, _experience(batch, data, received, old_logprobs), 0.1, algorithm)
        placeholder = torch.zeros(batch.num_samples, RESPONSE)
        held = skipping.update_on_policy(batch, _experience(batch, data, received, placeholder), 0.1, algorithm)
        report[coef] = {"plain_stats": plain_stats, "old_logprobs": old_logprobs, "entropy": entropy,
                        "held": held, "plain_weights": _weights(plain), "skip_weights": _weights(skipping)}
        if coef == ENTROPY_COEFS[0]:
            report["refusals"] = _refusals(skipping, batch, _experience(batch, data, received, placeholder))
    return report


def _refusals(worker, batch, experience) -> dict[str, str]:
    """The refusal message of each case that needs the old-policy pass; no weight may change."""
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig

    before = _weights(worker)
    cases = {
        "ppo_epochs": (PPOUpdateConfig(ppo_epochs=2, micro_batch_size=3), _algorithm(0.0)),
        "num_minibatches": (PPOUpdateConfig(num_minibatches=2, micro_batch_size=1), _algorithm(0.0)),
        "penalty": (PPOUpdateConfig(micro_batch_size=3), _algorithm(0.0, kl_mode="penalty")),
        "force_old_logprob_pass": (PPOUpdateConfig(micro_batch_size=3, force_old_logprob_pass=True), _algorithm(0.0)),
    }
    messages = {}
    for name, (update, algorithm) in cases.items():
        worker.trainer.update_config = update
        assert worker.old_logprob_pass_reason(algorithm) is not None
        try:
            worker.update_on_policy(batch, experience, 0.1, algorithm)
            messages[name] = ""
        except ValueError as error:
            messages[name] = str(error)
    after = _weights(worker)
    messages["changed"] = ",".join(name for name in before if not torch.equal(before[name], after[name]))
    return messages


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    root = tmp_path_factory.mktemp("on_policy_skip")
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


def _holders(ranks: list[dict], coef: float) -> list[tuple[list[int], dict]]:
    """``(received, report)`` of the rank holding each DP replica's results, by DP rank."""
    holders = {report["dp_rank"]: report for report in ranks if report[coef]["held"] is not None}
    return [(holders[dp]["received"], holders[dp][coef]) for dp in sorted(holders)]


@pytest.mark.parametrize("coef", ENTROPY_COEFS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_skip_gives_the_same_loss_grad_norm_and_weights(layout, coef, results):
    ranks = results(layout)
    first = ranks[0][coef]
    holders = _holders(ranks, coef)
    assert len(holders) == LAYOUTS[layout][1]
    for received, report in holders:
        (plain,), (skipped,) = report["plain_stats"], report["held"][0]
        assert not plain.skipped and not skipped.skipped
        assert abs(plain.loss - skipped.loss) <= TOLERANCE, (plain.loss, skipped.loss)
        assert abs(plain.grad_norm - skipped.grad_norm) <= TOLERANCE * max(1.0, plain.grad_norm)
        assert skipped.terms["ratio_deviation_max"] == 0.0 and skipped.terms["clip_fraction"] == 0.0
        assert skipped.terms["kl_loss"] == pytest.approx(plain.terms["kl_loss"], abs=TOLERANCE)
    assert sorted(name for name in first["plain_weights"]) == sorted(first["skip_weights"])
    worst = max((first["plain_weights"][name] - first["skip_weights"][name]).abs().max().item()
                for name in first["plain_weights"])
    assert worst <= TOLERANCE
    assert any(not torch.equal(tensor, ranks[0][ENTROPY_COEFS[1 - ENTROPY_COEFS.index(coef)]]["plain_weights"][name])
               for name, tensor in first["plain_weights"].items())  # the entropy bonus changed the update


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_skip_returns_the_old_policy_logprobs_and_entropy_in_batch_order(layout, results):
    from megatron_rlhf.parallel.data_dispatch import reassemble

    holders = _holders(results(layout), 0.0)
    shards = [received for received, _ in holders]
    assert sorted(sum(shards, [])) == list(range(SAMPLES))
    old = reassemble([report["old_logprobs"] for _, report in holders], shards)
    entropy = reassemble([report["entropy"] for _, report in holders], shards)
    skip_old = reassemble([report["held"][1] for _, report in holders], shards)
    skip_entropy = reassemble([report["held"][2] for _, report in holders], shards)
    mask = _batch(_data()).response_mask.bool()
    assert skip_old.shape == old.shape == (SAMPLES, RESPONSE)
    assert (skip_old[~mask] == 0).all() and (skip_entropy[~mask] == 0).all()
    assert (skip_old[mask] < 0).all() and (skip_entropy[mask] > 0).all()
    assert (skip_old - old).abs().max().item() <= TOLERANCE
    assert (skip_entropy - entropy).abs().max().item() <= TOLERANCE


def test_skip_is_refused_by_name_when_the_old_logprobs_are_needed(results):
    refusals = results("TP1")[0]["refusals"]
    assert "ppo_epochs=2" in refusals["ppo_epochs"]
    assert "num_minibatches=2" in refusals["num_minibatches"]
    assert "kl_mode='penalty'" in refusals["penalty"]
    assert "force_old_logprob_pass" in refusals["force_old_logprob_pass"]
    assert refusals["changed"] == ""
