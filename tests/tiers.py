"""Test tiers: a marker for every test from the directory it lives in, and time summed per tier.

Guarantees:

- Every collected test gets its directory's tier marker (``unit``, ``distributed``, ``vllm``,
  ``e2e``, ``gpu``), so a test file added later is marked without doing anything. Directories in
  :data:`SLOW_DIRECTORIES` and modules in :data:`SLOW_MODULES` are also marked ``slow``: what is
  left, ``-m "not slow"``, is the tier a developer runs while working (unit tests plus the faster
  distributed modules). Markers a file sets itself are kept; these only add.
- :class:`TierTimer` sums each test's set-up, call and tear-down seconds under the test's primary
  tier (its directory's) and prints one line per tier in pytest's terminal summary; with
  ``MEGATRON_RLHF_TIER_TIMES=<file>`` set it also writes them there (``scripts/run_tests.sh``
  prints that file last). Module- and session-scoped fixture set-up is charged to the first test
  that needs it, so the sums add up to the run's time less collection.

Does not guarantee: that a ``slow`` test is slow on a given machine, or that an unmarked one is
fast; the lists below were set from ``--durations`` on a 2-core CPU machine.
"""

from __future__ import annotations

import os
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


def _relative(item: pytest.Item) -> Path | None:
    try:
        return Path(str(item.path)).resolve().relative_to(TESTS_ROOT)
    except ValueError:
        return None


def tier_of(item: pytest.Item) -> str:
    """The item's primary tier: its directory's, or ``other`` outside the known directories."""
    relative = _relative(item)
    if relative is None or len(relative.parts) < 2:
        return "other"
    return DIRECTORY_TIERS.get(relative.parts[0], "other")


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


class TierTimer:
    """Sums test durations (set-up + call + tear-down) per primary tier; counts tests per tier."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.tests: dict[str, int] = defaultdict(int)
        self.tier_by_nodeid: dict[str, str] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.tier_by_nodeid = {item.nodeid: tier_of(item) for item in items}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        tier = self.tier_by_nodeid.get(report.nodeid, "other")
        self.seconds[tier] += report.duration
        if report.when == "call" or (report.when == "setup" and report.skipped):
            self.tests[tier] += 1

    def lines(self) -> list[str]:
        tiers = [tier for tier in TIER_ORDER if tier in self.seconds]
        total = sum(self.seconds.values())
        rows = [f"{tier:<12} {self.tests[tier]:>5} tests {self.seconds[tier]:>9.1f} s" for tier in tiers]
        rows.append(f"{'all':<12} {sum(self.tests.values()):>5} tests {total:>9.1f} s")
        return rows

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.seconds:
            return
        lines = self.lines()
        terminalreporter.write_sep("=", "time per tier (set-up + call + tear-down)")
        for line in lines:
            terminalreporter.write_line(line)
        target = os.environ.get("MEGATRON_RLHF_TIER_TIMES")
        if target:
            Path(target).write_text("\n".join(lines) + "\n")
