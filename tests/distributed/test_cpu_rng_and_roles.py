"""The CPU RNG tracker behaves like Megatron's CUDA one; scalar heads read the right hidden states.

RNG (TP2 x DP2, 4 ranks): the model-parallel stream differs between TP ranks and agrees across
data-parallel replicas; the default stream agrees everywhere; ``fork`` restores the outer state
and continues its own stream across forks; saved states replay; dropout inside a TP2 model is
active in training, reproducible from the seed, and off in eval.

Roles (TP2 x PP2): value, reward and PRM models built from an HF checkpoint output
``hidden_after_final_norm @ score`` per token (value, prm) or at the last real token of a
right-padded sequence (reward), matching transformers' own final hidden states within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed
VOCAB = 400


def _rng_worker(hf_dir: str):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model
    from megatron_rlhf.parallel.cpu_rng import CpuRNGStatesTracker
    from megatron_rlhf.parallel.init import initialize_parallel

    parallel = ParallelConfig(tensor_parallel=2)
    state = initialize_parallel(parallel, seed=7)
    tracker = get_cuda_rng_tracker()
    report = {"tp": state.tensor_parallel_rank, "dp": state.data_parallel_rank,
              "is_cpu_tracker": isinstance(tracker, CpuRNGStatesTracker)}
    report["default"] = torch.rand(4)
    saved = tracker.get_states()
    with tracker.fork():
        report["model_parallel"] = torch.rand(6)
    after_fork = torch.rand(4)
    torch.manual_seed(7)
    torch.rand(4)
    report["fork_restores_outer"] = torch.equal(after_fork, torch.rand(4))
    tracker.set_states(saved)
    with tracker.fork():
        first = torch.rand(3)
    with tracker.fork():
        second = torch.rand(3)
    report["forks_continue_stream"] = torch.equal(torch.cat([first, second]), report["model_parallel"])

    arch = arch_spec_from_hf_dir(hf_dir)
    outputs = []
    for seed in (11, 11):
        initialize_parallel(parallel, seed=seed)
        model = build_stage_model(arch, parallel, ModelBuildConfig(attention_dropout=0.5, hidden_dropout=0.2))
        tokens = torch.arange(16).reshape(1, 16) % VOCAB
        model.train()
        outputs.append((model(tokens), model(tokens)))
        model.eval()
        with torch.no_grad():
            outputs[-1] += (model(tokens), model(tokens))
    (a1, a2, a_eval1, a_eval2), (b1, b2, _, _) = outputs
    report["dropout_active"] = not torch.equal(a1, a2)
    report["dropout_reproducible"] = torch.equal(a1, b1) and torch.equal(a2, b2)
    report["eval_deterministic"] = torch.equal(a_eval1, a_eval2)
    return report


def _roles_worker(hf_dir: str, tokens: torch.Tensor, lengths: torch.Tensor, score: torch.Tensor):
    from megatron.core import parallel_state

    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.forward import forward_only
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel

    parallel = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)
    results = {}
    for role in ("value", "reward", "prm"):
        initialize_parallel(parallel, seed=3)
        arch = arch_spec_from_hf_dir(hf_dir)
        build = ModelBuildConfig(role=role)
        model = build_stage_model(arch, parallel, build)
        skipped = load_hf_weights(model, HFWeightReader(hf_dir), arch, role, validate_layout(arch, parallel, build))
        if model.head is not None:
            with torch.no_grad():
                model.head.score.weight.copy_(score)
        out = forward_only(model, [{"input_ids": tokens, "sequence_lengths": lengths}], lambda o, _: o)
        first_tp = parallel_state.get_tensor_model_parallel_rank() == 0
        results[role] = {"output": out[0] if out and first_tp else None, "skipped": skipped}
    return results


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model

    return str(make_tiny_hf_model("llama", tmp_path_factory.mktemp("roles") / "llama", seed=5, vocab_size=VOCAB))


@pytest.fixture(scope="module")
def rng_reports(hf_dir, rank_pool):
    return rank_pool.run(_rng_worker, 4, hf_dir)


def test_megatron_uses_the_cpu_tracker(rng_reports):
    assert all(r["is_cpu_tracker"] for r in rng_reports)


def test_model_parallel_stream_differs_by_tp_rank_and_agrees_across_dp(rng_reports):
    by_rank = {(r["tp"], r["dp"]): r["model_parallel"] for r in rng_reports}
    assert torch.equal(by_rank[(0, 0)], by_rank[(0, 1)])
    assert torch.equal(by_rank[(1, 0)], by_rank[(1, 1)])
    assert not torch.equal(by_rank[(0, 0)], by_rank[(1, 0)])


def test_default_stream_agrees_everywhere(rng_reports):
    assert all(torch.equal(r["default"], rng_reports[0]["default"]) for r in rng_reports)


def test_fork_restores_the_outer_state_and_continues_its_stream(rng_reports):
    assert all(r["fork_restores_outer"] and r["forks_continue_stream"] for r in rng_reports)


def test_dropout_in_tp_model_is_active_reproducible_and_off_in_eval(rng_reports):
    for report in rng_reports:
        assert report["dropout_active"]
        assert report["dropout_reproducible"]
        assert report["eval_deterministic"]


@pytest.fixture(scope="module")
def role_outputs(hf_dir, rank_pool):
    tokens = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([20, 13])
    tokens[1, 13:] = 2  # right padding
    score = torch.randn(1, 128, generator=torch.Generator().manual_seed(2)) * 0.1
    per_rank = rank_pool.run(_roles_worker, 4, hf_dir, tokens, lengths, score)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(input_ids=tokens).last_hidden_state  # after the final norm
    expected_tokens = (hidden @ score.T).squeeze(-1)
    expected_reward = expected_tokens[torch.arange(2), lengths - 1]
    got = {role: next(r[role] for r in per_rank if r[role]["output"] is not None) for role in ("value", "reward", "prm")}
    return got, expected_tokens, expected_reward


@pytest.mark.parametrize("role", ["value", "prm"])
def test_per_token_heads_match_transformers_hidden_states(role, role_outputs):
    got, expected_tokens, _ = role_outputs
    assert got[role]["output"].shape == expected_tokens.shape
    assert (got[role]["output"] - expected_tokens).abs().max().item() <= 1e-4


def test_reward_head_reads_the_last_real_token(role_outputs):
    got, _, expected_reward = role_outputs
    assert got["reward"]["output"].shape == (2,)
    assert (got["reward"]["output"] - expected_reward).abs().max().item() <= 1e-4


def test_fresh_score_head_is_reported_as_not_loaded(role_outputs):
    got, _, _ = role_outputs
    assert got["reward"]["skipped"] == ["head.score.weight"]
