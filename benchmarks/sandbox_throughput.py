"""Sandbox executions per second and per-execution overhead against a bare `python -c` subprocess.

    .venv/bin/python benchmarks/sandbox_throughput.py [--runs 200] [--concurrency 2]

Both sides run the same interpreter (the one the sandbox chose) on the same trivial program, in the
same run: sequentially (latency of one execution) and with ``--concurrency`` executions in flight
(throughput). The sandbox side is the full production path: cgroup creation, setpriv, prlimit,
bubblewrap with every namespace and the seccomp filter, output collection, teardown and cgroup
removal. A third row times a HumanEval-style function test through the code verifier (two
interpreters per execution: the test harness and the candidate runner). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlhf.rewards.sample import RewardSample, Verdict  # noqa: E402
from megatron_rlhf.rewards.sandbox.config import SandboxConfig  # noqa: E402
from megatron_rlhf.rewards.sandbox.executor import Sandbox  # noqa: E402
from megatron_rlhf.rewards.sandbox.process import ExecutionRequest  # noqa: E402
from megatron_rlhf.rewards.verifiers.code_verifier import CodeVerifier, CodeVerifierConfig  # noqa: E402

PROGRAM = "print(sum(range(1000)))"
TEST = {"test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == 9\n", "entry_point": "square"}


def timed(run_one, runs: int, concurrency: int) -> tuple[float, float]:
    """(median seconds of one execution run alone, executions per second at ``concurrency``)."""
    for _ in range(3):
        run_one()  # warm the page cache
    latencies = []
    for _ in range(runs):
        started = time.perf_counter()
        run_one()
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: run_one(), range(runs)))
    return statistics.median(latencies), runs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    sandbox = Sandbox(SandboxConfig(max_concurrency=args.concurrency))
    python = sandbox.python

    def bare() -> None:
        completed = subprocess.run([python, "-I", "-B", "-c", PROGRAM], capture_output=True)
        assert completed.returncode == 0

    request = ExecutionRequest(command=(python, "-I", "-B", "-c", PROGRAM))

    def sandboxed() -> None:
        result = sandbox.run(request)
        assert result.verdict is Verdict.OK, result

    verifier = CodeVerifier(CodeVerifierConfig(), sandbox=sandbox)
    sample = RewardSample("bench", "code", "", "def square(x):\n    return x * x\n", TEST)

    def function_test() -> None:
        assert verifier.score_one(sample).verdict is Verdict.OK

    rows = [("bare `python -c` subprocess", *timed(bare, args.runs, args.concurrency)),
            ("sandbox (`python -c`, full isolation)", *timed(sandboxed, args.runs, args.concurrency)),
            ("code verifier, HumanEval-style test", *timed(function_test, args.runs, args.concurrency))]
    verifier.close()
    sandbox.close()
    base_latency, base_rate = rows[0][1], rows[0][2]
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}; interpreter in the sandbox: {python}")
    print(f"runs per row: {args.runs}; concurrency: {args.concurrency}\n")
    print("| what | median latency (ms) | overhead vs bare (ms) | latency ratio | executions/s | rate ratio |")
    print("|---|---|---|---|---|---|")
    for name, latency, rate in rows:
        print(f"| {name} | {latency * 1e3:.1f} | {(latency - base_latency) * 1e3:+.1f} | "
              f"{latency / base_latency:.2f}x | {rate:.1f} | {rate / base_rate:.2f}x |")


if __name__ == "__main__":
    main()
