"""SDPACoreAttention computes what Megatron-Core's DotProductAttention computes (fp32, gloo CPU).

Core attention, 2 ranks, layouts TP2 and TP1 x DP2: for causal MHA, causal GQA (2 and 4 query
heads per KV head), an explicit boolean mask in Megatron's convention (causal + key padding) and
a single decoding query over 12 keys, every rank feeds its head shard of the same full
``q [sq, b, heads, d]``, ``k``/``v [sk, b, groups, d]`` to both modules. Their outputs and the
gradients of q, k and v (for a fixed random upstream gradient) agree within 1e-5; the output is
``[sq, b, heads / TP * d]``; the TP2 shards, concatenated, equal the TP1 output within 1e-5.

Dropout (TP2, attention_dropout=0.25): in eval the output equals Megatron's; in training it
differs from the eval output, replays from the saved model-parallel RNG state, leaves the
default RNG stream untouched (drawn under the tracker's fork, as Megatron does), and its mean
over 400 draws differs from the eval output by less than 0.025 (mean absolute difference over all
entries: inverted dropout is unbiased), as Megatron's does.

Model (TP2, tiny GQA llama: 4 heads, 2 KV heads, 2 layers): the default local spec uses
SDPACoreAttention and ``local_attention="megatron"`` DotProductAttention; both models have the
same state-dict keys (checkpoints are shared); with the same weights their logits agree within
1e-5 and every parameter gradient within 1e-5 of max(1, that parameter's largest gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


pytestmark = pytest.mark.distributed

TOLERANCE = 1e-5
SEQ, BATCH, HEAD_DIM = 12, 3, 32
# Mean over 400 training draws vs the eval output, mean |difference| over all entries: ~0.012
# for both modules here (sampling noise; query 0 sees one key, so its rows are the noisiest);
# dropout without the 1 / (1 - p) rescale would give ~0.1.
DROPOUT, DROPOUT_DRAWS, DROPOUT_MEAN_TOLERANCE = 0.25, 400, 0.025
VOCAB = 300


@dataclass(frozen=True)
class Case:
    name: str
    heads: int
    groups: int
    queries: int = SEQ
    """Query positions; 1 with SEQ keys is a decoding step (no causal mask, as in Megatron)."""
    key_padding: bool = False
    """Pass an explicit mask: causal plus padding keys beyond a per-sequence length."""


CASES = (
    Case("mha_causal", heads=4, groups=4),
    Case("gqa2_causal", heads=4, groups=2),
    Case("gqa4_causal", heads=8, groups=2),
    Case("explicit_mask", heads=4, groups=2, key_padding=True),
    Case("decode_one_query", heads=4, groups=2, queries=1),
)
CASE_NAMES = [case.name for case in CASES]


def _full_inputs(case: Case) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(map(ord, case.name)))
    inputs = {
        "query": torch.randn(case.queries, BATCH, case.heads, HEAD_DIM, generator=generator),
        "key": torch.randn(SEQ, BATCH, case.groups, HEAD_DIM, generator=generator),
        "value": torch.randn(SEQ, BATCH, case.groups, HEAD_DIM, generator=generator),
        "upstream": torch.randn(case.queries, BATCH, case.heads, HEAD_DIM, generator=generator),
    }
    if case.key_padding:  # Megatron's convention: True = masked out; key 0 is always visible
        lengths = torch.tensor([SEQ, SEQ // 2, 3])
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(diagonal=1)
        padding = torch.arange(SEQ).view(1, SEQ) >= lengths.view(BATCH, 1)
        inputs["mask"] = (causal.unsqueeze(0) | padding.unsqueeze(1)).unsqueeze(1)
    return inputs


def _core_config(case: Case, tensor_parallel: int, attention_dropout: float = 0.0):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=case.heads * HEAD_DIM,
        num_attention_heads=case.heads,
        num_query_groups=case.groups,
        kv_channels=HEAD_DIM,
        tensor_model_parallel_size=tensor_parallel,
        use_cpu_initialization=True,
        attention_dropout=attention_dropout,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
    )


def _core_modules(case: Case, tensor_parallel: int, attention_dropout: float = 0.0):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_rlhf.models.sdpa_attention import SDPACoreAttention

    config = _core_config(case, tensor_parallel, attention_dropout)
    kwargs = {"config": config, "layer_number": 1, "attn_mask_type": AttnMaskType.causal,
              "attention_type": "self"}
    return {"sdpa": SDPACoreAttention(**kwargs), "megatron": DotProductAttention(**kwargs)}


def _shard(case: Case, rank: int, tensor_parallel: int) -> dict[str, torch.Tensor]:
    """This rank's heads of the full inputs (query/upstream by head, key/value by group)."""
    full = _full_inputs(case)
    heads, groups = case.heads // tensor_parallel, case.groups // tensor_parallel
    shard = {name: full[name][:, :, rank * heads:(rank + 1) * heads] for name in ("query", "upstream")}
    shard.update({name: full[name][:, :, rank * groups:(rank + 1) * groups] for name in ("key", "value")})
    shard["mask"] = full.get("mask")
    return shard


def _run_core(module, shard: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    leaves = {name: shard[name].clone().requires_grad_(True) for name in ("query", "key", "value")}
    output = module(leaves["query"], leaves["key"], leaves["value"], shard["mask"])
    output.backward(shard["upstream"].reshape(output.shape))
    return {"output": output.detach(), **{f"grad_{name}": leaf.grad for name, leaf in leaves.items()}}


def _dropout_report(rank: int) -> dict[str, object]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    case = CASES[1]
    modules = _core_modules(case, 2, attention_dropout=DROPOUT)
    shard = _shard(case, rank, 2)
    args = (shard["query"], shard["key"], shard["value"], None)
    report: dict[str, object] = {}
    with torch.no_grad():
        for module in modules.values():
            module.eval()
        eval_outputs = {name: module(*args) for name, module in modules.items()}
        report["eval_max_diff"] = float((eval_outputs["sdpa"] - eval_outputs["megatron"]).abs().max())
        sdpa = modules["sdpa"].train()
        tracker = get_cuda_rng_tracker()
        saved_tracker, default_before = tracker.get_states(), torch.get_rng_state()
        first = sdpa(*args)
        report["default_stream_untouched"] = torch.equal(default_before, torch.get_rng_state())
        tracker.set_states(saved_tracker)
        report["replays"] = torch.equal(first, sdpa(*args))
        report["train_differs_from_eval"] = not torch.allclose(first, eval_outputs["sdpa"])
        for name, module in modules.items():
            module.train()
            mean = sum(module(*args) for _ in range(DROPOUT_DRAWS)) / DROPOUT_DRAWS
            deviation = (mean - eval_outputs[name]).abs().mean()
            report[f"{name}_mean_abs_deviation"] = float(deviation)
    return report


def _model_report() -> dict[str, object]:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model
    from megatron_rlhf.models.sdpa_attention import SDPACoreAttention
    from megatron_rlhf.models.tiny import tiny_hf_config

    parallel = ParallelConfig(tensor_parallel=2)
    arch = arch_spec_from_hf_config(tiny_hf_config("llama", VOCAB, num_hidden_layers=2).to_dict())
    builds = {
        "sdpa": ModelBuildConfig(transformer_impl="local"),  # the default local attention
        "megatron": ModelBuildConfig(transformer_impl="local", local_attention="megatron"),
    }
    models = {name: build_stage_model(arch, parallel, build) for name, build in builds.items()}
    report: dict[str, object] = {
        "core_types": {
            name: {type(layer.self_attention.core_attention) for layer in model.module.decoder.layers}
            == {expected}
            for (name, model), expected in zip(
                models.items(), (SDPACoreAttention, DotProductAttention), strict=True
            )
        },
        "same_state_keys": models["sdpa"].state_dict().keys() == models["megatron"].state_dict().keys(),
    }
    models["megatron"].load_state_dict(models["sdpa"].state_dict())
    generator = torch.Generator().manual_seed(5 + torch.distributed.get_rank())
    tokens = torch.randint(0, VOCAB, (2, 16), generator=generator)
    outputs, grads = {}, {}
    for name, model in models.items():
        logits = model(tokens)
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
        (logits * weights).sum().backward()
        outputs[name] = logits.detach()
        grads[name] = {param_name: param.grad for param_name, param in model.named_parameters()}
    report["logits_max_diff"] = float((outputs["sdpa"] - outputs["megatron"]).abs().max())
    report["grads_present"] = all(grad is not None for grad in grads["sdpa"].values())
    # Per parameter: largest |difference| over max(1, largest |gradient|) of that parameter
    # (the summed-logits loss gives gradients up to ~200 on the embeddings).
    report["grad_worst_relative_diff"] = max(
        float((grads["sdpa"][name] - grads["megatron"][name]).abs().max())
        / max(1.0, float(grads["megatron"][name].abs().max()))
        for name in grads["sdpa"]
    )
    return report


def _worker() -> dict[str, object]:
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.parallel.init import initialize_parallel

    results: dict[str, object] = {}
    for tensor_parallel in (2, 1):
        state = initialize_parallel(ParallelConfig(tensor_parallel=tensor_parallel), seed=3)
        rank = state.tensor_parallel_rank
        for case in CASES:
            shard = _shard(case, rank, tensor_parallel)
            results[f"TP{tensor_parallel}/{case.name}"] = {
                name: _run_core(module, shard)
                for name, module in _core_modules(case, tensor_parallel).items()
            }
        if tensor_parallel == 2:
            results["dropout"] = _dropout_report(rank)
            results["model"] = _model_report()
    return results


@pytest.fixture(scope="module")
def reports(rank_pool):
    return rank_pool.run(_worker, 2)


@pytest.mark.parametrize("layout", ["TP2", "TP1"])
@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_core_attention_matches_megatron_forward_and_gradients(reports, layout, case):
    tensor_parallel = int(layout[2:])
    for report in reports:
        result = report[f"{layout}/{case.name}"]
        sdpa, megatron = result["sdpa"], result["megatron"]
        assert sdpa["output"].shape == (case.queries, BATCH, case.heads // tensor_parallel * HEAD_DIM)
        for name in ("output", "grad_query", "grad_key", "grad_value"):
            torch.testing.assert_close(sdpa[name], megatron[name], atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_tp2_head_shards_concatenate_to_the_tp1_output(reports, case):
    shards = [report[f"TP2/{case.name}"]["sdpa"]["output"] for report in reports]
    full = reports[0][f"TP1/{case.name}"]["sdpa"]["output"]
    torch.testing.assert_close(torch.cat(shards, dim=-1), full, atol=TOLERANCE, rtol=TOLERANCE)


def test_dropout_only_in_training_on_the_model_parallel_stream(reports):
    for report in reports:
        dropout = report["dropout"]
        assert dropout["eval_max_diff"] <= TOLERANCE
        assert dropout["train_differs_from_eval"]
        assert dropout["replays"]
        assert dropout["default_stream_untouched"]


def test_dropout_is_unbiased_like_megatrons(reports):
    for report in reports:
        for name in ("sdpa", "megatron"):
            assert report["dropout"][f"{name}_mean_abs_deviation"] < DROPOUT_MEAN_TOLERANCE


def test_local_attention_selects_the_core_attention_module(reports):
    for report in reports:
        assert report["model"]["core_types"] == {"sdpa": True, "megatron": True}
        assert report["model"]["same_state_keys"]


def test_tp2_model_logits_and_gradients_match_megatron_attention(reports):
    for report in reports:
        model = report["model"]
        assert model["grads_present"]
        assert model["logits_max_diff"] <= TOLERANCE
        assert model["grad_worst_relative_diff"] <= TOLERANCE


def test_unknown_local_attention_is_rejected():
    from megatron_rlhf.models.provider import ModelBuildConfig

    with pytest.raises(ValueError, match="local_attention='flash'"):
        ModelBuildConfig(local_attention="flash")
