"""Set-up shared by the integration tier (real vLLM, Ray, Megatron workers).

``ray_cluster``: one local Ray instance for the whole session (per worker process under
pytest-xdist: each worker is a session of its own), started by the first test that needs it and
shut down at the end, instead of one per test or module. It is always a new local
instance (``address="local"``), never one another user started on this machine, with logical GPUs
for the placement tests. Tests must leave
no actor or placement group behind (they shut their worker groups down), so the next test finds
the cluster as the last one got it; the trainer's own start-up reuses an initialised Ray.

``rank_pool``: one pool of persistent gloo ranks for the tier (package-scoped: started by the
first module that needs it, ended after the last test of tests/integration/). The weight-sync
modules run their Megatron ranks, and the vLLM engines those ranks own, on it instead of spawning
fresh processes per module, so torch, Megatron-Core and vLLM are imported once per rank (see
megatron_rlhf/parallel/rank_pool.py for what a job may rely on). Each job still starts and shuts
down its own engines: nothing of a job outlives it but the imported modules.
``MEGATRON_RLHF_FRESH_RANKS=1`` gives fresh processes per job instead (``spawn``), to tell a
test's failure from a pool effect.

``tiny_hf_model``: the tiny models and tokenizers tests build, built once per session and keyed
by everything that makes them (family, seed, vocabulary, config overrides): several modules use
the same ones. Tests only read a model directory; they write their outputs elsewhere.

``target_token_inputs``: the policy, prompts and target-token reward of the RL learning tests
(:mod:`tests.integration.target_token_reward`), built and probed once per session for the
synchronous (``test_rl_improves_reward``) and one-step-off (``test_rl_async``) modules.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import pytest

RANK_POOL_SIZE = 4
"""The largest world an integration module spawns (the dense sync layouts up to TP2 x PP2)."""


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in the test process; the session fixture owns it")
    # 8 logical CPUs and 8 logical GPUs: the largest layouts of the tier (the GPU placement test's
    # 7 disaggregated GPUs). A CPU machine may declare GPUs it lacks: only groups that ask for a
    # GPU are given one (and CUDA_VISIBLE_DEVICES); every CPU run asks for none.
    ray.init(address="local", num_cpus=8, num_gpus=8, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


class FreshRanks:
    """``rank_pool``'s interface over ``spawn``: fresh processes for every job."""

    def run(self, function: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
        from megatron_rlhf.parallel.launch import spawn

        return spawn(function, world_size, *args)


@pytest.fixture(scope="package")
def rank_pool():
    if os.environ.get("MEGATRON_RLHF_FRESH_RANKS") == "1":
        yield FreshRanks()
        return
    from megatron_rlhf.parallel.rank_pool import RankPool

    with RankPool(RANK_POOL_SIZE) as pool:
        yield pool


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory) -> Callable[..., str]:
    """``tiny_hf_model(family, seed=, vocab_size=, tokenizer_vocab=, **overrides)`` -> model dir.

    The tokenizer is ``train_tiny_tokenizer(tokenizer_vocab or vocab_size, seed=0)``; the same
    arguments give the same directory for the whole session."""
    built: dict[str, str] = {}
    tokenizers: dict[int, Any] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def make(family: str, *, seed: int, vocab_size: int, tokenizer_vocab: int | None = None, **overrides: Any) -> str:
        from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

        tokenizer_vocab = tokenizer_vocab or vocab_size
        key = json.dumps([family, seed, vocab_size, tokenizer_vocab, sorted(overrides.items())])
        if key not in built:
            if tokenizer_vocab not in tokenizers:
                tokenizers[tokenizer_vocab] = train_tiny_tokenizer(tokenizer_vocab, seed=0)
            directory = root / f"{family}-{len(built)}"
            built[key] = str(make_tiny_hf_model(family, directory, seed=seed, vocab_size=vocab_size,
                                                tokenizer=tokenizers[tokenizer_vocab], **overrides))
        return built[key]

    return make


@pytest.fixture(scope="session")
def target_token_inputs(tmp_path_factory, tiny_hf_model) -> dict[str, Any]:
    """:func:`tests.integration.target_token_reward.make_run_inputs`, once per session."""
    from tests.integration.target_token_reward import make_run_inputs

    return make_run_inputs(tmp_path_factory.mktemp("rl_reward"), tiny_hf_model)
