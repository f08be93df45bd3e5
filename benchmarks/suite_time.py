"""The whole CI suite at two commits, side by side: time per tier and the ratio.

    .venv/bin/python benchmarks/suite_time.py BASE [HEAD] [--rounds N] [--scratch DIR]

Each commit is cloned from this checkout into its own scratch folder (``git clone`` + ``checkout``,
so uncommitted changes never leak in) and runs exactly what CI runs, ``bash .ci/run`` with
``CI=true``, one commit after the other on the same machine (``--rounds 2`` runs A B B A, to
spread a drift in machine load over both). Each clone gets a link to this checkout's ``.venv`` (the
bootstrap in ``.ci/run`` is then a no-op when both commits pin the same environment) and
``PYTHONPATH`` set to the clone, so the test process, its spawned ranks and its Ray workers all
import the clone's package.

Printed: for each run, the per-tier seconds that ``scripts/run_tests.sh`` prints last (set-up +
call + tear-down, summed per tier: with test files in parallel worker processes these add up to
more than the wall time), the run's wall seconds and the CPU seconds of the processes it waited
for; then per tier and for the whole ``.ci/run`` wall time, the mean over rounds at each commit and
``HEAD / BASE``, and the tests each ran. The last line is ``suite_time_ratio=<wall HEAD / BASE>``:
what a developer waits, the issue's measure. Exit status 1 when any run failed (its tier times are
still printed, marked).

Does not guarantee: a quiet machine (run it alone; the one-minute load average is printed before
each run), or CPU seconds of processes the suite does not wait for (Ray's daemons, the local Slurm
cluster's jobs): those count in wall time only. A full run takes about twice the suite's time per
round; it is not part of CI.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIER_LINE = re.compile(r"^(\w+)\s+(\d+) tests\s+([\d.]+) s$")
"""A line of tests/tiers.py's summary: ``<tier> <count> tests <seconds> s``."""


@dataclass
class SuiteRun:
    commit: str
    status: int
    wall_seconds: float
    cpu_seconds: float
    load_before: float
    tier_seconds: dict[str, float] = field(default_factory=dict)
    tier_tests: dict[str, int] = field(default_factory=dict)


def parse_tier_times(output: str) -> tuple[dict[str, float], dict[str, int]]:
    """The tier lines after run_tests.sh's ``time per tier`` header (the last such block)."""
    lines = output.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith("run_tests: time per tier")]
    seconds: dict[str, float] = {}
    tests: dict[str, int] = {}
    for line in lines[starts[-1] + 1:] if starts else []:
        match = TIER_LINE.match(line.strip())
        if match is None:
            break
        seconds[match.group(1)] = float(match.group(3))
        tests[match.group(1)] = int(match.group(2))
    return seconds, tests


def clone(commit: str, scratch: Path, venv: Path) -> Path:
    """A checkout of ``commit`` under ``scratch`` with a link to ``venv``."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    target = scratch / sha[:12]
    if not target.exists():
        subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(REPO), str(target)], check=True)
        subprocess.run(["git", "-C", str(target), "checkout", "--quiet", "--detach", sha], check=True)
    link = target / ".venv"
    if not link.exists():
        link.symlink_to(venv.resolve())
    return target


def run_suite(checkout: Path, commit: str, log_dir: Path) -> SuiteRun:
    env = dict(os.environ, CI="true", PYTHONPATH=str(checkout))
    load = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    result = subprocess.run(["bash", ".ci/run"], cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    log = log_dir / f"{checkout.name}-{int(time.time())}.log"
    log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    seconds, tests = parse_tier_times(result.stdout)
    return SuiteRun(commit, result.returncode, wall, cpu, load, seconds, tests)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def ratio(head: float, base: float) -> float:
    return head / base if base > 0 else float("nan")


def report(runs: list[SuiteRun], base: str, head: str) -> list[str]:
    lines = []
    for run in runs:
        mark = "" if run.status == 0 else f"  FAILED (exit {run.status})"
        tiers = " ".join(f"{tier}={seconds:.1f}" for tier, seconds in run.tier_seconds.items())
        lines.append(f"{run.commit}: load {run.load_before:.2f} wall {run.wall_seconds:.1f} s "
                     f"cpu {run.cpu_seconds:.1f} s | {tiers}{mark}")
    tiers = [tier for tier in dict.fromkeys(t for run in runs for t in run.tier_seconds)]
    lines.append(f"{'tier':<12} {base[:12]:>12} {head[:12]:>12} {'head/base':>10}")
    for tier in tiers:
        base_mean = mean([run.tier_seconds[tier] for run in runs if run.commit == base and tier in run.tier_seconds])
        head_mean = mean([run.tier_seconds[tier] for run in runs if run.commit == head and tier in run.tier_seconds])
        lines.append(f"{tier:<12} {base_mean:>12.1f} {head_mean:>12.1f} {ratio(head_mean, base_mean):>10.3f}")
    base_wall = mean([run.wall_seconds for run in runs if run.commit == base])
    head_wall = mean([run.wall_seconds for run in runs if run.commit == head])
    lines.append(f"{'wall':<12} {base_wall:>12.1f} {head_wall:>12.1f} {ratio(head_wall, base_wall):>10.3f}")
    base_tests = max((run.tier_tests.get("all", 0) for run in runs if run.commit == base), default=0)
    head_tests = max((run.tier_tests.get("all", 0) for run in runs if run.commit == head), default=0)
    lines.append(f"{'tests':<12} {base_tests:>12} {head_tests:>12}")
    lines.append(f"suite_time_ratio={ratio(head_wall, base_wall):.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the commit to compare against")
    parser.add_argument("head", nargs="?", default="HEAD", help="the commit measured (default HEAD)")
    parser.add_argument("--rounds", type=int, default=1, help="1: A B; 2: A B B A; n: alternating pairs")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the clones (default: a new temp dir)")
    parser.add_argument("--venv", type=Path, default=REPO / ".venv", help="environment linked into each clone")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if not (args.venv / "bin" / "python").exists():
        parser.error(f"--venv {args.venv} has no bin/python (run scripts/bootstrap_env.sh --with-vllm first)")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="suite_time_"))
    scratch.mkdir(parents=True, exist_ok=True)
    checkouts = {commit: clone(commit, scratch, args.venv) for commit in (args.base, args.head)}
    order = []
    for round_index in range(args.rounds):
        pair = [args.base, args.head] if round_index % 2 == 0 else [args.head, args.base]
        order.extend(pair)
    runs = []
    for commit in order:
        print(f"suite_time: running .ci/run at {commit} ({checkouts[commit]})", flush=True)
        runs.append(run_suite(checkouts[commit], commit, scratch))
        print(report(runs[-1:], args.base, args.head)[0], flush=True)
    for line in report(runs, args.base, args.head):
        print(line)
    print(f"suite_time: logs in {scratch}")
    return 0 if all(run.status == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
