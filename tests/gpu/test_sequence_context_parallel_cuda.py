"""On 2 GPUs with Transformer Engine: context parallelism (CP2, the sequence split in 2*CP
load-balanced chunks, log-probs gathered back) and sequence parallelism (TP2 + SP) give the
same actor log-probs and first PPO step loss as one GPU; and the MoE training step at TP2xEP2
(with SP, 4 GPUs) matches one GPU.

CP needs TE's ring attention, so it does not run on CPU (refused there with a clear error, see
tests/unit/test_context_parallel_split.py); the pure split and its inverse are unit-tested on CPU.
SP also runs on CPU with the local spec's norms (tests/distributed/test_moe_tp_ep.py); here it
runs with TE's. Skipped without 2 CUDA devices and TE.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.parallel.launch import spawn

pytestmark = pytest.mark.gpu
TOLERANCE = 1e-4
SAMPLES, PROMPT, RESPONSE, VOCAB = 4, 5, 7, 300


def _batch():
    from megatron_rlhf.types import RolloutBatch

    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 3, 5, 1])
    mask = (torch.arange(RESPONSE).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return RolloutBatch(prompt_ids=torch.randint(3, VOCAB, (SAMPLES, PROMPT), generator=generator),
                        prompt_lengths=torch.full((SAMPLES,), PROMPT),
                        response_ids=torch.randint(3, VOCAB, (SAMPLES, RESPONSE), generator=generator) * mask.long(),
                        response_mask=mask, sampling_logprobs=torch.zeros(SAMPLES, RESPONSE),
                        finish_reasons=["stop"] * SAMPLES, group_index=torch.arange(SAMPLES),
                        prompt_index=torch.arange(SAMPLES), pad_token_id=0)


def _worker(parallel: ParallelConfig, hf_dir: str):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from dataclasses import replace

    from megatron_rlhf.algorithms import AlgorithmConfig
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.training.actor_critic import ActorTrainer, PPOUpdateConfig
    from megatron_rlhf.training.megatron_step import OptimizerSettings

    initialize_parallel(parallel, seed=1)
    arch = arch_spec_from_hf_dir(hf_dir)
    build = ModelBuildConfig(transformer_impl="transformer_engine")
    model = build_stage_model(arch, parallel, build, device=torch.device("cuda", torch.cuda.current_device()))
    load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", validate_layout(arch, parallel, build),
                    impl="transformer_engine")
    trainer = ActorTrainer(model, OptimizerSettings(lr=1e-4), AlgorithmConfig(), PPOUpdateConfig(micro_batch_size=2),
                           valid_vocab_size=VOCAB)
    batch = _batch()
    logprobs = trainer.logprobs(batch)
    from megatron_rlhf.algorithms import Experience

    mask = batch.response_mask
    experience = Experience(response_mask=mask.bool(), old_logprobs=logprobs - 0.1 * mask,
                            advantages=torch.linspace(-1, 1, SAMPLES).unsqueeze(1) * mask,
                            token_rewards=torch.zeros_like(mask), sequence_scores=torch.zeros(SAMPLES),
                            raw_rewards=torch.zeros(SAMPLES))
    step = trainer.update(batch, replace(experience))[0]
    return logprobs, step.loss


@pytest.mark.parametrize("layout", [ParallelConfig(context_parallel=2),
                                    ParallelConfig(tensor_parallel=2, sequence_parallel=True)],
                         ids=["CP2", "TP2-SP"])
def test_cp_and_sp_match_one_gpu(layout, tmp_path):
    if torch.cuda.device_count() < 2 or importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("needs 2 CUDA devices and Transformer Engine")
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    hf_dir = str(make_tiny_hf_model("llama", tmp_path / "llama", seed=3, vocab_size=VOCAB,
                                    tokenizer=train_tiny_tokenizer(VOCAB, seed=0)))
    expected_logprobs, expected_loss = spawn(_worker, 1, ParallelConfig(), hf_dir)[0]
    for logprobs, loss in spawn(_worker, 2, layout, hf_dir):
        assert (logprobs - expected_logprobs).abs().max().item() <= TOLERANCE
        assert loss == pytest.approx(expected_loss, abs=TOLERANCE)


def test_moe_step_at_tp2xep2_with_sequence_parallel_matches_one_gpu(tmp_path):
    """The MoE training step at TP2xEP2 with SP and the TE spec (Megatron-Core needs SP for MoE
    with TP > 1; the local spec's step runs on CPU in tests/distributed/test_moe_tp_ep.py)."""
    if torch.cuda.device_count() < 4 or importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("needs 4 CUDA devices and Transformer Engine")
    from tests.distributed.test_moe_expert_parallel_step import _worker, moe_checkpoint, step_losses

    hf_dir, tokens = moe_checkpoint(tmp_path)
    expected = spawn(_worker, 1, "EP1", hf_dir, tokens, "transformer_engine")
    ranks = spawn(_worker, 4, "TP2xEP2-SP", hf_dir, tokens, "transformer_engine")
    assert step_losses(ranks) == pytest.approx(step_losses(expected), abs=1e-5)
    actual, reference = ranks[0]["weights"], expected[0]["weights"]
    assert max((actual[name] - reference[name]).abs().max().item() for name in reference) <= 1e-5
