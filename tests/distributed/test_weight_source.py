"""The Megatron ``WeightSource`` honours vLLM's source contract at every layout (gloo, CPU).

vLLM's trainer engines (``nccl``, ``ipc``, and this package's ``gloo`` / ``shm``) rely on it:
``metadata()`` declares exactly what iteration yields, element for element (names, dtypes,
full HF shapes), on every trainer rank; ``groups()`` / ``iter_groups()`` (vLLM's defaults,
built on ``layerwise_groups``) batch the stream in metadata order without raising; iterating
twice gives the same weights (a fresh pass each round), cast to the requested dtype; binding
another model drops the cached metadata. Checked at TP2 PP2 and, for a MoE model, at EP2,
against the HF checkpoint the model was loaded from. The weight sync's source (``only_rank0``)
declares the same metadata on every rank, yields full tensors on the sending rank 0 only (equal
to the checkpoint) and ``meta`` stand-ins of the same names, shapes and dtypes elsewhere; after
an update its next pass (on the routes agreed by the first: nothing but tensors move) yields
the updated weights.
"""

from __future__ import annotations


import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]


def _source_worker(parallel: ParallelConfig, hf_dir: str):
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.rollout.weight_source import megatron_weight_source

    initialize_parallel(parallel, seed=0)
    arch = arch_spec_from_hf_dir(hf_dir)
    build = ModelBuildConfig()
    model = build_stage_model(arch, parallel, build)
    reader = HFWeightReader(hf_dir)
    load_hf_weights(model, reader, arch, "lm", validate_layout(arch, parallel, build))

    source = megatron_weight_source(torch.bfloat16, device="cpu")
    source.bind(model, arch, "lm")
    meta = source.metadata()
    first = list(source)
    second = list(source)
    grouped = list(source.iter_groups())
    declared = [(m.name, m.dtype, tuple(m.shape)) for m in meta]
    yielded = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in first]
    cached = source.metadata() is meta
    # the weight sync's source: full tensors on the sending rank 0 only, meta stand-ins elsewhere
    sender_source = megatron_weight_source(torch.bfloat16, device="cpu", only_rank0=True)
    sender_source.bind(model, arch, "lm")
    sender_declared = [(m.name, m.dtype, tuple(m.shape)) for m in sender_source.metadata()]
    sender_pairs = list(sender_source)
    is_sender = torch.distributed.get_rank() == 0
    with torch.no_grad():  # an update: later syncs reuse the first export's routes, never its values
        for parameter in model.parameters():
            parameter.add_(1.0)
    moved = list(sender_source)
    source.bind(torch.nn.Linear(1, 1), arch, "lm")  # another model: metadata must be re-derived
    dropped = source._metadata is None
    return {
        "declared_equals_yielded": declared == yielded,
        "fresh_pass_equal": all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(first, second)),
        "groups_cover_metadata": [n for names, _ in grouped for n in names] == [m.name for m in meta],
        "values_match_checkpoint": all(torch.equal(t, reader.get(n).to(torch.bfloat16)) for n, t in first),
        "names_match_checkpoint": sorted(n for n, _ in first) == sorted(reader.names()),
        "metadata_cached": cached,
        "metadata_dropped_on_rebind": dropped,
        "sender_source_declares_the_same": sender_declared == declared,
        "sender_source_yields_what_it_declares": [(n, t.dtype, tuple(t.shape)) for n, t in sender_pairs] == declared,
        "sender_source_full_on_rank0_only": all(t.is_meta != is_sender for _, t in sender_pairs),
        "sender_source_values_on_rank0": not is_sender or all(
            torch.equal(t, reader.get(n).to(torch.bfloat16)) for n, t in sender_pairs),
        "sender_source_follows_weight_changes": [(n, t.dtype, tuple(t.shape)) for n, t in moved] == declared and (
            not is_sender or all(torch.equal(t, (reader.get(n).float() + 1.0).to(torch.bfloat16)) for n, t in moved)),
        "declared": declared,
    }


@pytest.mark.parametrize("arch,parallel,world", [
    ("llama", ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 4),
    ("qwen3_moe", ParallelConfig(expert_parallel=2), 2),
], ids=["llama-TP2PP2", "qwen3_moe-EP2"])
def test_megatron_source_keeps_vllms_contract_on_every_rank(arch, parallel, world, tmp_path, rank_pool):
    from megatron_rlhf.models.tiny import make_tiny_hf_model

    hf_dir = str(make_tiny_hf_model(arch, tmp_path / arch, seed=5, vocab_size=500))
    results = rank_pool.run(_source_worker, world, parallel, hf_dir)
    for rank, result in enumerate(results):
        checks = {key: value for key, value in result.items() if key != "declared"}
        assert all(checks.values()), (rank, checks)
    assert all(result["declared"] == results[0]["declared"] for result in results)
