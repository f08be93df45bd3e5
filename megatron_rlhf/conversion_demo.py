"""The main job on one CPU machine, until the RL demo lands: a verified conversion round trip.

:func:`run_conversion_demo` makes a tokenizer and a tiny model locally, converts it to a Megatron
distributed checkpoint at TP x PP, runs the checkpoint at that layout against transformers on the
same tokens, exports it back to HF while loading it at a different layout (TP1 PP1, exercising
resharding of the distributed checkpoint), and compares every tensor of the round trip with the
original bit for bit. Writes ``report.json`` in the output folder; returns 0 when everything
checks out, 1 otherwise.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _compare_checkpoints(original_dir: Path, round_trip_dir: Path) -> list[str]:
    """Names of tensors that differ (or are missing on one side)."""
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader

    original, round_trip = HFWeightReader(original_dir), HFWeightReader(round_trip_dir)
    names = sorted(set(original.names()) | set(round_trip.names()))
    return [
        name
        for name in names
        if name not in original
        or name not in round_trip
        or not torch.equal(original.get(name), round_trip.get(name))
    ]


def run_conversion_demo(
    out_dir: str, architecture: str = "llama", tensor_parallel: int = 2, pipeline_parallel: int = 2
) -> int:
    from megatron_rlhf.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_rlhf.checkpoint.verify import VerificationFailed, verify_checkpoint
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    root = Path(out_dir)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    timings: dict[str, float] = {}

    def phase(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 2)
        print(f"[demo] {name}: done in {timings[name]:.1f} s", flush=True)

    start = time.perf_counter()
    tokenizer = train_tiny_tokenizer(vocab_size=500, seed=0)
    hf_dir = make_tiny_hf_model(architecture, root / "hf", seed=0, vocab_size=500, tokenizer=tokenizer)
    phase(f"tokenizer + tiny {architecture} model -> {hf_dir}", start)

    start = time.perf_counter()
    ckpt_dir = root / f"megatron_tp{tensor_parallel}_pp{pipeline_parallel}"
    hf_to_megatron(str(hf_dir), str(ckpt_dir), tensor_parallel, pipeline_parallel)
    phase(f"HF -> Megatron at TP{tensor_parallel} PP{pipeline_parallel}", start)

    start = time.perf_counter()
    try:
        max_abs_logit_diff = verify_checkpoint(str(hf_dir), str(ckpt_dir))
        verified = True
    except VerificationFailed as failure:
        max_abs_logit_diff, verified = failure.max_abs_diff, False
    phase(f"verify logits against transformers (max |diff| = {max_abs_logit_diff:.2e})", start)

    start = time.perf_counter()
    round_trip_dir = root / "hf_round_trip"
    megatron_to_hf(str(ckpt_dir), str(round_trip_dir), tensor_parallel=1, pipeline_parallel=1)
    differing = _compare_checkpoints(hf_dir, round_trip_dir)
    phase("Megatron (loaded resharded at TP1 PP1) -> HF, compared bit for bit", start)

    report = {
        "architecture": architecture,
        "layout": {"tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel},
        "max_abs_logit_diff": max_abs_logit_diff,
        "logits_verified": verified,
        "round_trip_bit_exact": not differing,
        "differing_tensors": differing,
        "seconds": timings,
    }
    (root / "report.json").write_text(json.dumps(report, indent=2))
    ok = verified and not differing
    print(f"[demo] report: {root / 'report.json'}")
    print(f"[demo] logits match: {verified}; round trip bit-exact: {not differing}")
    print(f"max_abs_logit_diff={max_abs_logit_diff}")
    return 0 if ok else 1
