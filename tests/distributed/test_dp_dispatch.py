"""An RL actor step with each data-parallel replica handed only its share of the batch.

The real :class:`~megatron_rlhf.workers.megatron_worker.ActorWorker` runs in every rank of a
gloo world (DP1, DP2, TP2xDP2) on the distributed tier's rank pool, joined as its worker group
joins it (rank 0 opens the rendezvous store and announces its port, the others connect to it).
Each rank is given what the role proxies of :mod:`megatron_rlhf.workers.role_proxies` would hand
it: the token-balanced share of its DP replica
(:func:`~megatron_rlhf.parallel.data_dispatch.balanced_shards`, 2 minibatches). It computes
log-probs and entropy of its share (read back only from each replica's output rank and
reassembled in batch order) and runs 2 PPO epochs x 2 minibatches on its share. Checked against
DP1 within 1e-5: log-probs, step losses, gradient norms and every updated weight; and that each
rank received exactly its replica's samples (TP peers the same ones, replicas disjoint).

In the same worlds, without extra launches: at DP2, ``overlap_grad_reduce=True`` gives the same
weights; at DP1, selective and full activation recomputation give the same loss and gradients
as none within 1e-6; at DP2 and TP2xDP2 the weight-sync export (``only_rank0``) materialises
every full tensor on rank 0 alone, equal to the everywhere export, and ``meta`` stand-ins of the
same names, shapes and dtypes on the other ranks.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-5
RECOMPUTE_TOLERANCE = 1e-6
SAMPLES, PROMPT, RESPONSE = 8, 6, 8
LAYOUTS = {
    "DP1": (ParallelConfig(), 1),
    "DP2": (ParallelConfig(), 2),
    "TP2xDP2": (ParallelConfig(tensor_parallel=2), 2),
}


def _data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    prompt_lengths = torch.randint(2, PROMPT + 1, (SAMPLES,), generator=generator)
    prompt_ids = torch.randint(3, VOCAB, (SAMPLES, PROMPT), generator=generator)
    prompt_ids[torch.arange(PROMPT).unsqueeze(0) >= prompt_lengths.unsqueeze(1)] = 0
    response_lengths = torch.tensor([8, 1, 5, 2, 7, 3, 6, 4])
    response_ids = torch.randint(3, VOCAB, (SAMPLES, RESPONSE), generator=generator)
    response_ids[torch.arange(RESPONSE).unsqueeze(0) >= response_lengths.unsqueeze(1)] = 0
    noise = {name: torch.randn(SAMPLES, RESPONSE, generator=generator) * 0.3
             for name in ("old_logprobs", "ref_logprobs", "advantages")}
    return {"prompt_ids": prompt_ids, "prompt_lengths": prompt_lengths, "response_ids": response_ids,
            "response_lengths": response_lengths, **noise}


def _batch(data):
    from megatron_rlhf.types import RolloutBatch

    mask = (torch.arange(RESPONSE).unsqueeze(0) < data["response_lengths"].unsqueeze(1)).float()
    return RolloutBatch(prompt_ids=data["prompt_ids"], prompt_lengths=data["prompt_lengths"],
                        response_ids=data["response_ids"], response_mask=mask,
                        sampling_logprobs=torch.zeros(SAMPLES, RESPONSE), finish_reasons=["stop"] * SAMPLES,
                        group_index=torch.arange(SAMPLES) // 2, prompt_index=torch.arange(SAMPLES) // 2,
                        pad_token_id=0)


def _experience(batch, data):
    from megatron_rlhf.algorithms import Experience

    mask = batch.response_mask
    zeros = torch.zeros(SAMPLES, RESPONSE)
    return Experience(response_mask=mask.bool(), old_logprobs=(data["old_logprobs"] - 5.0) * mask,
                      advantages=data["advantages"] * mask, token_rewards=zeros, sequence_scores=torch.zeros(SAMPLES),
                      raw_rewards=torch.zeros(SAMPLES), ref_logprobs=(data["ref_logprobs"] - 5.0) * mask,
                      returns=zeros, old_values=zeros)


def _weights(model, arch) -> dict[str, torch.Tensor]:
    from megatron_rlhf.mapping.engine import export_hf_weights

    return {name: tensor.detach().clone() for name, tensor in export_hf_weights(model, arch, "lm")}


def _side_trainer(worker, parallel: ParallelConfig, update=None):
    """A second actor model + trainer in the same world (another layout knob, same weights)."""
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.training.actor_critic import ActorTrainer

    build = ModelBuildConfig(role="lm")
    model = build_stage_model(worker.arch, parallel, build)
    padded = validate_layout(worker.arch, parallel, build)
    load_hf_weights(model, HFWeightReader(worker.spec.hf_dir), worker.arch, "lm", padded)
    return model, ActorTrainer(model, worker.spec.optimizer, worker.spec.algorithm, update or worker.spec.update,
                               valid_vocab_size=worker.valid_vocab_size)


def _gradients(trainer) -> dict[str, torch.Tensor]:
    return {name: param.main_grad.detach().clone() for name, param in trainer.updater.model.module.named_parameters()}


def _recompute_checks(worker, share, experience) -> dict[str, float]:
    """Loss and gradient differences of selective / full recompute against none (one step)."""
    from megatron_rlhf.training.ppo_update import PPOUpdateConfig

    one_step = PPOUpdateConfig(ppo_epochs=1, num_minibatches=1, micro_batch_size=2)
    results = {}
    for name, parallel in {
        "none": worker.spec.parallel,
        "selective": replace(worker.spec.parallel, recompute_granularity="selective"),
        "full": replace(worker.spec.parallel, recompute_granularity="full", recompute_method="uniform",
                        recompute_num_layers=1),
    }.items():
        _, trainer = _side_trainer(worker, parallel, one_step)
        step = trainer.update(share, experience)[0]
        results[name] = (step.loss, _gradients(trainer))
    base_loss, base_grads = results.pop("none")
    return {
        f"{name}_{what}": value
        for name, (loss, grads) in results.items()
        for what, value in (("loss", abs(loss - base_loss)),
                            ("grad", max((grads[k] - base_grads[k]).abs().max().item() for k in base_grads)))
    }


def _rank0_export(worker) -> dict:
    from megatron_rlhf.mapping.engine import export_hf_weights

    everywhere = _weights(worker.model, worker.arch)
    pairs = [(name, tensor.clone()) for name, tensor in export_hf_weights(worker.model, worker.arch, "lm",
                                                                           only_rank0=True)]
    shapes_match = [name for name, _ in pairs] == list(everywhere) and all(
        tensor.shape == everywhere[name].shape and tensor.dtype == everywhere[name].dtype for name, tensor in pairs)
    if torch.distributed.get_rank() == 0:
        return {"shapes_match": shapes_match, "materialised": all(not t.is_meta for _, t in pairs),
                "equal": all(torch.equal(t, everywhere[n]) for n, t in pairs)}
    return {"shapes_match": shapes_match, "materialised": any(not t.is_meta for _, t in pairs), "equal": None}


def _join(worker, rendezvous: str) -> None:
    """What the worker group does through Ray: rank 0 opens the rendezvous store and announces its
    address and port (here through a file), then every rank joins the process group with them."""
    path = Path(rendezvous)
    if worker.rank == 0:
        address, port = worker.rendezvous_address()
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps([address, port]))
        partial.rename(path)
    else:
        deadline = time.monotonic() + 600
        while not path.exists():
            assert time.monotonic() < deadline, f"rank 0 announced no rendezvous in {path}"
            time.sleep(0.05)
        address, port = json.loads(path.read_text())
    worker.join_process_group(address, port)


def _rank(layout: str, hf_dir: str, data: dict[str, torch.Tensor], rendezvous: str) -> dict:
    from megatron_rlhf.algorithms import AlgorithmConfig
    from megatron_rlhf.parallel.data_dispatch import balanced_shards, sample_tokens, select_rollout
    from megatron_rlhf.training.megatron_step import OptimizerSettings
    from megatron_rlhf.training.ppo_update import PPOUpdateConfig
    from megatron_rlhf.workers.megatron_worker import ActorWorker, RoleWorkerSpec

    parallel = LAYOUTS[layout][0]
    update = PPOUpdateConfig(ppo_epochs=2, num_minibatches=2, micro_batch_size=1)
    spec = RoleWorkerSpec(hf_dir=hf_dir, parallel=parallel, optimizer=OptimizerSettings(lr=1e-3, adam_eps=1e-3),
                          algorithm=AlgorithmConfig(kl_mode="loss", kl_estimator="k3", entropy_coef=0.01),
                          update=update, seed=1)
    worker = ActorWorker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), spec)
    _join(worker, rendezvous)
    me = worker.rank_layout()
    batch = _batch(data)
    experience = _experience(batch, data)
    shards = balanced_shards(sample_tokens(batch).tolist(), me.dp_size, update.num_minibatches)
    received = shards[me.dp_rank]
    share = select_rollout(batch, received)
    share_experience = experience.select(torch.as_tensor(received))
    before = _weights(worker.model, worker.arch)
    report = {
        "layout": me,
        "received": received,
        "received_prompts": share.prompt_ids.clone(),
        "logprobs": worker.logprobs_and_entropy(share),
        "steps": worker.update(share, share_experience, 0.05),
    }
    weights = _weights(worker.model, worker.arch)  # a collective: every rank exports
    report["weights"] = weights if me.rank == 0 else None
    if layout == "DP2":  # the same update with the DP gradient reduce overlapped with backward
        model, trainer = _side_trainer(worker, replace(parallel, overlap_grad_reduce=True))
        assert all(torch.equal(before[k], v) for k, v in _weights(model, worker.arch).items())
        trainer.update(share, share_experience, kl_coef=0.05)
        overlap_weights = _weights(model, worker.arch)
        report["overlap_weights"] = overlap_weights if me.rank == 0 else None
    if layout != "DP1":  # the weight sync's export: full tensors on the sending rank 0 only
        report["rank0_export"] = _rank0_export(worker)
    if layout == "DP1":
        report["recompute"] = _recompute_checks(worker, share, share_experience)
    worker.shutdown()
    return report


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    root = tmp_path_factory.mktemp("dp_dispatch")
    return str(make_tiny_hf_model("llama", root / "llama", seed=5, vocab_size=VOCAB, tokenizer=tokenizer))


@pytest.fixture(scope="module")
def results(hf_dir, rank_pool, tmp_path_factory):
    data = _data()
    cache: dict[str, list[dict]] = {}
    rendezvous = tmp_path_factory.mktemp("rendezvous")

    def run(layout: str) -> list[dict]:
        if layout not in cache:
            parallel, dp = LAYOUTS[layout]
            cache[layout] = rank_pool.run(_rank, parallel.world_size(dp), layout, hf_dir, data,
                                          str(rendezvous / f"{layout}.json"))
        return cache[layout]

    return run


def _gathered_logprobs(ranks: list[dict]) -> torch.Tensor:
    """What the role proxy does: the output rank of each replica, reassembled in batch order."""
    from megatron_rlhf.parallel.data_dispatch import output_ranks, reassemble

    holders = output_ranks([report["layout"] for report in ranks])
    assert all(ranks[r]["logprobs"] is None for r in range(len(ranks)) if not ranks[r]["layout"].holds_output)
    shards = [ranks[h.rank]["received"] for h in holders]
    return reassemble([ranks[h.rank]["logprobs"][0] for h in holders], shards)


def _worst(actual: dict, expected: dict) -> float:
    assert sorted(actual) == sorted(expected)
    return max((actual[name] - expected[name]).abs().max().item() for name in expected)


@pytest.mark.parametrize("layout", ["DP2", "TP2xDP2"])
def test_each_replica_is_handed_only_its_share(layout, results):
    data = _data()
    ranks = results(layout)
    by_replica: dict[int, list] = {}
    for report in ranks:
        assert len(report["received"]) == SAMPLES // report["layout"].dp_size
        assert torch.equal(report["received_prompts"], data["prompt_ids"][report["received"]])
        by_replica.setdefault(report["layout"].dp_rank, []).append(report["received"])
    for shares in by_replica.values():  # TP peers of a replica got the same samples
        assert all(share == shares[0] for share in shares)
    replicas = [shares[0] for shares in by_replica.values()]
    assert sorted(sum(replicas, [])) == list(range(SAMPLES))  # disjoint, complete
    for minibatch in range(2):  # every replica has a part of every minibatch
        for share in replicas:
            assert sum(minibatch * 4 <= i < (minibatch + 1) * 4 for i in share) == 2


@pytest.mark.parametrize("layout", ["DP2", "TP2xDP2"])
def test_step_matches_dp1(layout, results):
    expected, ranks = results("DP1")[0], results(layout)
    worst = (_gathered_logprobs(ranks) - _gathered_logprobs(results("DP1"))).abs().max().item()
    assert worst <= TOLERANCE, f"log-probs {layout}: {worst:.3e}"
    for report in ranks:
        assert len(report["steps"]) == 4
        assert [s.loss for s in report["steps"]] == pytest.approx([s.loss for s in expected["steps"]], abs=TOLERANCE)
        assert [s.grad_norm for s in report["steps"]] == pytest.approx(
            [s.grad_norm for s in expected["steps"]], abs=TOLERANCE)
    assert _worst(ranks[0]["weights"], expected["weights"]) <= TOLERANCE


def test_overlapped_grad_reduce_gives_the_same_weights(results):
    ranks = results("DP2")
    assert _worst(ranks[0]["overlap_weights"], ranks[0]["weights"]) <= TOLERANCE


@pytest.mark.parametrize("layout", ["DP2", "TP2xDP2"])
def test_weight_export_for_the_sync_materialises_tensors_only_on_rank0(layout, results):
    ranks = results(layout)
    assert ranks[0]["rank0_export"] == {"shapes_match": True, "materialised": True, "equal": True}
    for report in ranks[1:]:
        assert report["rank0_export"] == {"shapes_match": True, "materialised": False, "equal": None}


def test_recompute_gives_the_same_loss_and_gradients(results):
    differences = results("DP1")[0]["recompute"]
    assert sorted(differences) == ["full_grad", "full_loss", "selective_grad", "selective_loss"]
    assert all(value <= RECOMPUTE_TOLERANCE for value in differences.values()), differences
