"""SFT with packed token-budget microbatches gives the padded path's losses and weights.

At TP1, TP2 (sequence parallel: packed rows tail-padded to a multiple of 2), PP2 (rows padded to
one common length) and DP2, two copies of the same tiny llama run
:func:`~megatron_rlhf.trainer.sft.train_sft` on the same 9 conversations of varied lengths
(2 optimizer steps of 4, validation on 3 before and after): one with right-padded microbatches
of 2, one with ``packing: true`` and a ``max_tokens_per_microbatch`` budget that pairs the
conversations differently (first-fit decreasing by length). Checked within 1e-6 (fp32): every step loss and gradient norm, every
validation loss, and every parameter of this rank's shard after training; the packed run reports
a smaller ``padding_fraction``.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-6
LAYOUTS = {
    "TP1": (ParallelConfig(), 1),
    "TP2": (ParallelConfig(tensor_parallel=2, sequence_parallel=True), 1),
    "PP2": (ParallelConfig(pipeline_parallel=2), 1),
    "DP2": (ParallelConfig(), 2),
}


def _conversations(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for index in range(count):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        messages = [{"role": "user", "content": f"What is {a} + {b}?" + " Please." * (index % 4)},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}." + " Done." * (index % 3)}]
        if index % 2:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        examples.append({"messages": messages})
    return examples


def _job(parallel: ParallelConfig, hf_dir: str) -> dict:
    from transformers import AutoTokenizer

    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.trainer.sft import SFTConfig, train_sft
    from megatron_rlhf.training.megatron_step import OptimizerSettings

    arch = arch_spec_from_hf_dir(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    initialize_parallel(parallel, seed=1)
    padded = SFTConfig(epochs=1, global_batch_size=4, micro_batch_size=2, seed=3, progress_bar=False)
    packed = SFTConfig(epochs=1, global_batch_size=4, micro_batch_size=1, seed=3, progress_bar=False,
                       packing=True, max_tokens_per_microbatch=130)
    optimizer = OptimizerSettings(lr=1e-3, adam_eps=1e-3, clip_grad=1.0)
    reports, parameters = {}, {}
    for name, config in (("padded", padded), ("packed", packed)):
        build = ModelBuildConfig(transformer_impl="local")
        model = build_stage_model(arch, parallel, build)
        load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", validate_layout(arch, parallel, build))
        reports[name] = train_sft(model, arch, tokenizer, _conversations(1, 9), config, optimizer,
                                  _conversations(2, 3))
        parameters[name] = {key: value.detach().clone() for key, value in model.named_parameters()}
    return {"reports": reports,
            "weight_gap": max((parameters["padded"][key] - parameters["packed"][key]).abs().max().item()
                              for key in parameters["padded"])}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    root = tmp_path_factory.mktemp("sft_packing")
    return str(make_tiny_hf_model("llama", root / "llama", seed=5, vocab_size=VOCAB, tokenizer=tokenizer,
                                  hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=128))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_sft_gives_the_padded_losses_and_weights(layout, hf_dir, rank_pool):
    parallel, data_parallel = LAYOUTS[layout]
    for rank in rank_pool.run(_job, parallel.world_size(data_parallel), parallel, hf_dir):
        padded, packed = rank["reports"]["padded"], rank["reports"]["packed"]
        assert len(padded.steps) == len(packed.steps) == 2
        for before, after in zip(padded.steps, packed.steps):
            assert abs(before.loss - after.loss) <= TOLERANCE, (before.loss, after.loss)
            assert abs(before.grad_norm - after.grad_norm) <= TOLERANCE * max(1.0, before.grad_norm)
            assert 0.0 <= after.padding_fraction < before.padding_fraction
        assert len(padded.validation) == len(packed.validation) == 2
        for before, after in zip(padded.validation, packed.validation):
            assert abs(before.loss - after.loss) <= TOLERANCE and before.tokens == after.tokens
        assert rank["weight_gap"] <= TOLERANCE
