"""The LM head at the read positions only gives the full forward's logits there, and its gradients.

In one gloo world of the distributed tier's rank pool, at TP1, TP2 and TP2 with sequence
parallelism, with separate and tied input/output embeddings, a real Megatron ``GPTModel`` (lm
role, local SDPA spec) runs each microbatch twice through
:func:`megatron_rlhf.models.forward.run_microbatch`: without ``positions`` (full logits
``[b, T, V/TP]``, then read at the positions) and with them (the output layer at those positions
only, ``[b, R, V/TP]``), for right-padded rows and for a packed THD row. A loss with fixed random
weights on the read logits is backpropagated both ways. Checked within 1e-6 (fp32): the logits,
every parameter's gradient on this rank, and that the output layer's ``sequence_parallel``
attribute is back after the call. Also: a mismatch of logits and positions is refused by name.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

VOCAB = 300
TOLERANCE = 1e-6
LAYOUTS = {
    "TP1": ParallelConfig(),
    "TP2": ParallelConfig(tensor_parallel=2),
    "TP2SP": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
}


def _gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _compare(model, full_microbatch: dict, microbatch: dict, read) -> dict[str, float]:
    from megatron_rlhf.models.forward import run_microbatch

    full = read(run_microbatch(model, full_microbatch))
    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(11))
    (full * weights).sum().backward()
    full_grads = _gradients(model)
    layer = model.module.output_layer
    sequence_parallel = layer.sequence_parallel
    selected = run_microbatch(model, microbatch)
    (selected * weights).sum().backward()
    grads = _gradients(model)
    assert sorted(grads) == sorted(full_grads)
    return {
        "shape_ok": float(tuple(selected.shape) == tuple(full.shape)),
        "logits_gap": float((selected - full).abs().max()),
        "grad_gap": max(float((grads[name] - full_grads[name]).abs().max()) / max(1.0, float(full_grads[name].abs().max()))
                        for name in grads),
        "restored": float(layer.sequence_parallel == sequence_parallel),
    }


def _job(parallel: ParallelConfig, tie: bool) -> dict:
    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.models.packing import pack_microbatch
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model
    from megatron_rlhf.models.sequence_logprobs import microbatch_response_logprobs
    from megatron_rlhf.models.sequence_padding import sequence_multiple
    from megatron_rlhf.models.tiny import tiny_hf_config
    from megatron_rlhf.parallel.init import initialize_parallel

    initialize_parallel(parallel, seed=3)
    arch = arch_spec_from_hf_config(tiny_hf_config("llama", VOCAB, num_hidden_layers=2, tie_word_embeddings=tie).to_dict())
    model = build_stage_model(arch, parallel, ModelBuildConfig(transformer_impl="local"))
    generator = torch.Generator().manual_seed(5)  # the same tokens on every rank
    tokens = torch.randint(3, VOCAB, (3, 16), generator=generator)
    lengths = torch.tensor([16, 9, 12])
    positions = torch.stack([torch.randint(0, int(n) - 1, (5,), generator=generator) for n in lengths])
    rows = torch.arange(3).unsqueeze(1)
    report = {"padded": _compare(model, {"input_ids": tokens}, {"input_ids": tokens, "positions": positions},
                                 lambda logits: logits[rows, positions])}
    packed = pack_microbatch(tokens, lengths, positions, torch.arange(3), sequence_multiple(model.config))
    unread = {name: value for name, value in packed.items() if name != "positions"}
    report["packed"] = _compare(model, unread, packed, lambda logits: logits[0][packed["positions"]])
    try:
        microbatch_response_logprobs(torch.zeros(3, 16, 4), {"input_ids": tokens, "positions": positions}, VOCAB,
                                     1.0, False)
        report["mismatch_refused"] = ""
    except ValueError as error:
        report["mismatch_refused"] = str(error)
    return report


@pytest.fixture(scope="module")
def reports(rank_pool):
    cache: dict[tuple[str, bool], list[dict]] = {}

    def run(layout: str, tie: bool) -> list[dict]:
        if (layout, tie) not in cache:
            parallel = LAYOUTS[layout]
            cache[(layout, tie)] = rank_pool.run(_job, parallel.world_size(1), parallel, tie)
        return cache[(layout, tie)]

    return run


@pytest.mark.parametrize("tie", [False, True], ids=["separate", "tied"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_at_positions_equal_the_full_forward_and_its_gradients(layout, tie, reports):
    for report in reports(layout, tie):
        for kind in ("padded", "packed"):
            result = report[kind]
            assert result["shape_ok"] == 1.0 and result["restored"] == 1.0, (kind, result)
            assert result["logits_gap"] <= TOLERANCE, (kind, result)
            assert result["grad_gap"] <= TOLERANCE, (kind, result)
        assert "response positions" in report["mismatch_refused"]
