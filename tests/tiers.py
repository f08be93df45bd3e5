"""Test tiers: a marker for every test from the directory it lives in, and time summed per tier.

Guarantees:

- Every collected test gets its directory's tier marker (``unit``, ``distributed``, ``vllm``,
  ``e2e``, ``gpu``), so a test file added later is marked without doing anything. Directories in
  :data:`SLOW_DIRECTORIES` and modules in :data:`SLOW_MODULES` are also marked ``slow``: what is
  left, ``-m "not slow"``, is the tier a developer runs while working (unit tests plus the faster
  distributed modules). Markers a file sets itself are kept; these only add.
- :class:`TierTimer` sums each test's set-up, call and tear-down seconds under the test's primary
  tier (its directory's) and prints one line per tier in pytest's terminal summary, then the
  run's wall time and how many processes ran tests (``pytest -n N``, pytest-xdist: the sums then
  add up to about N times the wall time, less idle workers); with
  ``MEGATRON_RLHF_TIER_TIMES=<file>`` set it also writes them there (``scripts/run_tests.sh``
  prints that file last). Under xdist it runs in the controlling process only (reports from the
  workers reach it; the tier is read from the test's node id). Module- and session-scoped fixture
  set-up is charged to the first test that needs it, so the sums add up to the run's test time
  less collection.

- :func:`order_for_workers` puts the modules that take longest first (:data:`LONGEST_MODULES`,
  then the e2e, vllm, distributed and unit tiers, alphabetical within each), keeping each module's
  tests together and in file order: with ``pytest -n N --dist loadfile --no-loadscope-reorder``
  (``scripts/run_tests.sh``) a module's tests, and the engines and clusters its fixtures start,
  stay in one worker, and the long modules start first instead of one of them running alone at
  the end. (xdist's ``loadgroup`` cannot split a module instead: with pytest 9 its group suffix
  never reaches the node id. A long module that shares nothing expensive between two halves is
  two files, as the quick studies are.)

Does not guarantee: that a ``slow`` test is slow on a given machine, or that an unmarked one is
fast; the lists below were set from ``--durations`` on a 2-core CPU machine.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

TESTS_ROOT = Path(__file__).resolve().parent

DIRECTORY_TIERS = {
    "unit": "unit",
    "distributed": "distributed",
    "integration": "vllm",
    "e2e": "e2e",
    "gpu": "gpu",
}
"""Top-level directory under tests/ -> the tier marker its tests get."""

SLOW_DIRECTORIES = frozenset({"integration", "e2e"})
"""Every test under these is also marked ``slow`` (each module starts vLLM, Ray or both)."""

SLOW_MODULES = frozenset({
    "distributed/test_checkpoint_tools.py",
    "distributed/test_train_state_resume.py",
    "distributed/test_reward_model_learns.py",
    "distributed/test_sft_learns.py",
    "distributed/test_weight_source.py",
    "distributed/test_dp_dispatch.py",
    "unit/test_bad_input_commands.py",
    "unit/test_planner_meta.py",
})
"""Modules (relative to tests/) marked ``slow``: each needs a minute or more. (The planner's exact
bytes and the MoE expert-parallel step left the list when they moved onto the rank pool: a few
seconds per layout once the pool is up.)"""

TIER_ORDER = ("unit", "distributed", "vllm", "e2e", "gpu", "other")

LONGEST_MODULES = (
    "integration/test_studies_quick.py",
    "e2e/test_demo_quick.py",
    "integration/test_slurm_launchers.py",
    "e2e/test_rl_resume.py",
)
"""Modules (relative to tests/) that take longest, longest first (``--durations`` on a 2-core CPU
machine, 2026-12-07, one test process: about 274, 160, 143 and 140 s): handed out first by
:func:`order_for_workers`."""

WORKER_TIER_ORDER = ("e2e", "vllm", "distributed", "unit", "gpu", "other")
"""After :data:`LONGEST_MODULES`, the tiers in the order their modules are handed to workers: the
longest modules first, the many short unit modules last to fill the workers' ends evenly."""


def _relative(item: pytest.Item) -> Path | None:
    try:
        return Path(str(item.path)).resolve().relative_to(TESTS_ROOT)
    except ValueError:
        return None


def tier_of_path(relative: Path | None) -> str:
    """The tier of a test file given relative to tests/: its top directory's, else ``other``."""
    if relative is None or len(relative.parts) < 2:
        return "other"
    return DIRECTORY_TIERS.get(relative.parts[0], "other")


def tier_of(item: pytest.Item) -> str:
    """The item's primary tier: its directory's, or ``other`` outside the known directories."""
    return tier_of_path(_relative(item))


def tier_of_nodeid(nodeid: str, rootdir: Path) -> str:
    """The tier of a test known only by its node id (``tests/unit/test_x.py::test_y``, relative
    to ``rootdir``): what an xdist controller has, which collects nothing itself."""
    try:
        relative = (rootdir / nodeid.split("::", 1)[0]).resolve().relative_to(TESTS_ROOT)
    except ValueError:
        return "other"
    return tier_of_path(relative)


def apply_tier_markers(items: list[pytest.Item]) -> None:
    """Add the directory's tier marker (and ``slow`` where listed) to every item."""
    for item in items:
        relative = _relative(item)
        if relative is None or len(relative.parts) < 2:
            continue
        tier = DIRECTORY_TIERS.get(relative.parts[0])
        if tier is not None and item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))
        slow = relative.parts[0] in SLOW_DIRECTORIES or relative.as_posix() in SLOW_MODULES
        if slow and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


def order_for_workers(items: list[pytest.Item]) -> None:
    """Sort ``items`` in place (see the module docstring)."""

    def key(item: pytest.Item) -> tuple[int, int, str]:
        relative = _relative(item)
        module = relative.as_posix() if relative is not None else ""
        if module in LONGEST_MODULES:
            return (0, LONGEST_MODULES.index(module), module)
        return (1, WORKER_TIER_ORDER.index(tier_of_path(relative)), module)

    items.sort(key=key)  # stable: a module's tests keep their order


class TierTimer:
    """Sums test durations (set-up + call + tear-down) per primary tier; counts tests per tier;
    times the whole run (see the module docstring)."""

    def __init__(self, rootdir: Path, workers: int = 1) -> None:
        self.rootdir = rootdir
        self.workers = workers
        self.seconds: dict[str, float] = defaultdict(float)
        self.tests: dict[str, int] = defaultdict(int)
        self.tier_by_nodeid: dict[str, str] = {}
        self.started = time.monotonic()

    def pytest_sessionstart(self) -> None:
        self.started = time.monotonic()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.tier_by_nodeid = {item.nodeid: tier_of(item) for item in items}

    def tier(self, nodeid: str) -> str:
        if nodeid not in self.tier_by_nodeid:
            self.tier_by_nodeid[nodeid] = tier_of_nodeid(nodeid, self.rootdir)
        return self.tier_by_nodeid[nodeid]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        tier = self.tier(report.nodeid)
        self.seconds[tier] += report.duration
        if report.when == "call" or (report.when == "setup" and report.skipped):
            self.tests[tier] += 1

    def lines(self, wall_seconds: float | None = None) -> list[str]:
        tiers = [tier for tier in TIER_ORDER if tier in self.seconds]
        total = sum(self.seconds.values())
        rows = [f"{tier:<12} {self.tests[tier]:>5} tests {self.seconds[tier]:>9.1f} s" for tier in tiers]
        rows.append(f"{'all':<12} {sum(self.tests.values()):>5} tests {total:>9.1f} s")
        if wall_seconds is not None:
            processes = f"{self.workers} worker processes" if self.workers > 1 else "one process"
            rows.append(f"{'wall':<12} {'':>11} {wall_seconds:>9.1f} s  (tests run in {processes})")
        return rows

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.seconds:
            return
        lines = self.lines(time.monotonic() - self.started)
        terminalreporter.write_sep("=", "time per tier (set-up + call + tear-down)")
        for line in lines:
            terminalreporter.write_line(line)
        target = os.environ.get("MEGATRON_RLHF_TIER_TIMES")
        if target:
            Path(target).write_text("\n".join(lines) + "\n")


def xdist_workers(config: pytest.Config) -> int:
    """How many processes run the tests: pytest-xdist's ``-n`` once resolved (1 without it)."""
    workers = getattr(config.option, "numprocesses", None)
    return workers if isinstance(workers, int) and workers > 0 else 1
