"""HF -> Megatron conversion under every layout: logits match transformers, round trip is exact.

For each architecture family and each layout in {TP1 PP1, TP2 PP1, TP1 PP2, TP2 PP2} (plus EP2
and TP2xEP2 for the MoE families), the ranks build the Megatron model at that layout, fill it
from the HF safetensors through ``megatron_rlhf.mapping``, run a forward pass with Megatron's
pipeline schedule and stream the weights back out in HF naming. Checked in the parent:

- max |logits - transformers logits| <= 1e-4 (fp32), over every position and vocabulary entry;
- every HF tensor comes back bit for bit, with the same set of names.

The models are made here (random weights, norms != 1, biases != 0) with a vocabulary of 500, so
Megatron's vocabulary padding is exercised at every TP size. One job per layout (on the shared
rank pool) keeps the tier fast: each worker loops over all architectures.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rlhf.config.parallel import ParallelConfig

pytestmark = pytest.mark.distributed

DENSE = ("llama", "qwen2", "qwen3", "glm", "glm4")
MOE = ("qwen3_moe", "mixtral")
VOCAB = 500
TOLERANCE = 1e-4
LAYOUTS = {
    "TP1PP1": ParallelConfig(),
    "TP2PP1": ParallelConfig(tensor_parallel=2),
    "TP1PP2": ParallelConfig(pipeline_parallel=2),
    "TP2PP2": ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
    "EP2": ParallelConfig(expert_parallel=2),
    "TP2EP2": ParallelConfig(tensor_parallel=2, expert_parallel=2),
}
CASES = [(arch, layout) for layout in LAYOUTS for arch in DENSE + MOE if "EP" not in layout] + [
    (arch, layout) for layout in ("EP2", "TP2EP2") for arch in MOE
]


def _layout_worker(parallel: ParallelConfig, models: dict[str, str], tokens: torch.Tensor):
    """In each rank: convert, run, export every model; rank 0 reports per architecture."""
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.mapping.engine import export_hf_weights, load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.forward import forward_only, gather_vocab_parallel_logits
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.parallel.init import initialize_parallel

    reports = {}
    for name, hf_dir in models.items():
        initialize_parallel(parallel, seed=1)
        arch = arch_spec_from_hf_dir(hf_dir)
        build = ModelBuildConfig(transformer_impl="local")
        padded = validate_layout(arch, parallel, build)
        model = build_stage_model(arch, parallel, build)
        reader = HFWeightReader(hf_dir)
        load_hf_weights(model, reader, arch, "lm", padded)
        outputs = forward_only(
            model,
            [{"input_ids": tokens}],
            lambda logits, _: gather_vocab_parallel_logits(logits, arch.vocab_size),
        )
        exported = dict(export_hf_weights(model, arch, "lm"))
        differing = [
            n for n in reader.names() if n not in exported or not torch.equal(exported[n], reader.get(n))
        ]
        reports[name] = {
            "logits": outputs[0] if outputs else None,
            "names_match": sorted(exported) == reader.names(),
            "bitwise": differing,
            "padded_vocab": padded,
        }
    return reports


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("hf_models")
    tokenizer = train_tiny_tokenizer(VOCAB, seed=0)
    return {
        arch: str(make_tiny_hf_model(arch, root / arch, seed=7, vocab_size=VOCAB, tokenizer=tokenizer))
        for arch in DENSE + MOE
    }


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def reference_logits(hf_models, tokens):
    from transformers import AutoModelForCausalLM

    logits = {}
    for arch, hf_dir in hf_models.items():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[arch] = model(input_ids=tokens).logits
    return logits


@pytest.fixture(scope="module")
def layout_reports(hf_models, tokens, rank_pool):
    cache: dict[str, dict] = {}

    def run(layout: str) -> dict:
        if layout not in cache:
            parallel = LAYOUTS[layout]
            archs = MOE if "EP" in layout else DENSE + MOE
            models = {arch: hf_models[arch] for arch in archs}
            world = parallel.minimal_world_size
            per_rank = rank_pool.run(_layout_worker, world, parallel, models, tokens)
            merged = {}
            for arch in archs:
                logits = [r[arch]["logits"] for r in per_rank if r[arch]["logits"] is not None]
                merged[arch] = dict(per_rank[0][arch], all_logits=logits)
            cache[layout] = merged
        return cache[layout]

    return run


@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{l}" for a, l in CASES])
def test_logits_match_transformers(arch, layout, layout_reports, reference_logits):
    report = layout_reports(layout)[arch]
    assert report["all_logits"], "no rank returned logits"
    for logits in report["all_logits"]:
        assert logits.shape == reference_logits[arch].shape
        diff = (logits - reference_logits[arch]).abs().max().item()
        assert diff <= TOLERANCE, f"{arch} at {layout}: max abs logit diff {diff:.3e}"


@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{l}" for a, l in CASES])
def test_round_trip_is_bit_exact(arch, layout, layout_reports):
    report = layout_reports(layout)[arch]
    assert report["names_match"], f"{arch} at {layout}: exported tensor names differ from HF's"
    assert report["bitwise"] == [], f"{arch} at {layout}: tensors differ: {report['bitwise'][:5]}"


@pytest.mark.parametrize("layout", ["TP1PP1", "TP2PP2"])
def test_vocabulary_is_padded(layout, layout_reports):
    report = layout_reports(layout)["llama"]
    tp = LAYOUTS[layout].tensor_parallel
    assert report["padded_vocab"] > VOCAB and report["padded_vocab"] % (128 * tp) == 0
