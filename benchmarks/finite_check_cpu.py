"""The non-finite step check of ``MegatronUpdater`` on CPU: four ways to ask "is every gradient finite?".

Builds the actor of ``benchmarks/actor_update_cpu.py`` (same sizes, its ``build_sides``), runs one
update on that benchmark's batch so that every gradient buffer holds real gradients, then times, interleaved, each variant over the same
gradients (medians of ``--repeats`` calls):

- ``per parameter, isfinite().all()``: the check before 2026-12-08 (a boolean per element);
- ``per buffer, isfinite().all()``: the same over the DDP's contiguous gradient buffers;
- ``per parameter, aminmax``: minimum and maximum of each ``main_grad`` (NaN propagates);
- ``per buffer, aminmax``: what ``MegatronUpdater._all_finite`` does now (its own code is timed).

Each variant must answer True on these gradients; the script checks that.

Run::

    .venv/bin/python benchmarks/finite_check_cpu.py [--sizes d256-L4 d512-L8] [--repeats 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import actor_update_cpu as bench  # noqa: E402  (the actor and its batch, as that benchmark builds them)


def _variants(updater):
    import torch

    from megatron_rlhf.parallel.megatron_compat import gradient_buffers

    grads = [p.main_grad for p in updater.model.parameters() if getattr(p, "main_grad", None) is not None]
    buffers = gradient_buffers(updater.model)

    def isfinite_all(tensors):
        return bool(all(bool(torch.isfinite(t).all()) for t in tensors))

    def aminmax(tensors):
        finite = torch.tensor(True)
        for tensor in tensors:
            low, high = torch.aminmax(tensor)
            finite &= torch.isfinite(low) & torch.isfinite(high)
        return bool(finite)

    return {
        "per parameter, isfinite().all()": lambda: isfinite_all(grads),
        "per buffer, isfinite().all()": lambda: isfinite_all(buffers),
        "per parameter, aminmax": lambda: aminmax(grads),
        "per buffer, aminmax (MegatronUpdater)": lambda: updater._all_finite([1.0]),
    }, len(grads)


def _worker(size: str, repeats: int, result_path: str) -> None:
    import json

    plan = bench.BenchPlan(size=size)
    with tempfile.TemporaryDirectory(prefix="finite_check_") as work:
        _, actor, hf_model = bench.build_sides(plan, Path(work))
    batch = bench.make_batch(plan)
    actor.update(batch, bench.make_experience(plan, batch, hf_model))  # real gradients in every buffer
    updater = actor.updater
    variants, tensors = _variants(updater)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(repeats):
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for name in order:
            start = time.perf_counter()
            assert variants[name](), f"{name}: the gradients of a normal update were reported non-finite"
            times[name].append(time.perf_counter() - start)
    Path(result_path).write_text(json.dumps({"size": size, "tensors": tensors,
                                             "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}}))


def main() -> None:
    import json

    from megatron_rlhf.parallel.launch import spawn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(bench.SIZES), choices=list(bench.SIZES))
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="finite_check_result_") as scratch:
            result = str(Path(scratch) / "result.json")
            spawn(_worker, 1, size, args.repeats, result)
            rows.append(json.loads(Path(result).read_text()))
    names = list(rows[0]["ms"])
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in rows:
        print(f"| {row['size']} ({row['tensors']} tensors) | "
              + " | ".join(f"{row['ms'][name]:.2f} ms" for name in names) + " |")


if __name__ == "__main__":
    main()
