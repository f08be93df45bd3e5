"""tests/tiers.py: the tier of a test known by node id only (an xdist controller's view) and the
per-tier summary with the run's wall time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiers import TESTS_ROOT, TierTimer, tier_of_nodeid

ROOT = TESTS_ROOT.parent


@pytest.mark.parametrize(("nodeid", "tier"), [
    ("tests/unit/test_tiers.py::test_x", "unit"),
    ("tests/distributed/test_dp_dispatch.py::test_y[a::b]", "distributed"),
    ("tests/integration/test_rl_loop.py::test_z", "vllm"),
    ("tests/e2e/test_rl_resume.py::test_w", "e2e"),
    ("tests/tiers.py::test_v", "other"),
    ("elsewhere/test_a.py::test_b", "other"),
], ids=["unit", "distributed", "vllm", "e2e", "tests-root", "outside"])
def test_a_node_id_names_its_directory_tier(nodeid, tier):
    assert tier_of_nodeid(nodeid, ROOT) == tier


def _report(nodeid: str, when: str, duration: float, outcome: str = "passed") -> pytest.TestReport:
    return pytest.TestReport(nodeid, ("x.py", 0, "x"), {}, outcome, None, when, [], duration=duration)


def test_reports_from_workers_are_summed_per_tier_and_the_wall_time_follows(tmp_path):
    timer = TierTimer(ROOT, workers=2)  # no collection here: as in an xdist controller
    for nodeid, seconds in (("tests/unit/test_a.py::t1", 1.0), ("tests/unit/test_a.py::t2", 2.0),
                            ("tests/integration/test_b.py::t", 10.0)):
        for when in ("setup", "call", "teardown"):
            timer.pytest_runtest_logreport(_report(nodeid, when, seconds))
    timer.pytest_runtest_logreport(_report("tests/e2e/test_c.py::t", "setup", 0.5, outcome="skipped"))
    lines = timer.lines(wall_seconds=21.25)
    assert lines[0].split() == ["unit", "2", "tests", "9.0", "s"]
    assert lines[1].split() == ["vllm", "1", "tests", "30.0", "s"]
    assert lines[2].split() == ["e2e", "1", "tests", "0.5", "s"]
    assert lines[3].split() == ["all", "4", "tests", "39.5", "s"]
    assert lines[4].split()[:3] == ["wall", "21.2", "s"] and "2 worker processes" in lines[4]
    assert "one process" in TierTimer(Path(ROOT)).lines(wall_seconds=1.0)[-1]


def test_the_longest_modules_come_first_and_each_module_keeps_its_order():
    """A real collection (pytest in a subprocess) of modules from every tier, given in the
    opposite order: the RL studies, then the e2e resume module, the rest of integration,
    distributed, unit."""
    modules = ["tests/unit/test_tiers.py", "tests/distributed/test_dp_dispatch.py", "tests/integration/test_rl_loop.py",
               "tests/e2e/test_rl_resume.py", "tests/integration/test_studies_quick.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *modules],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    nodeids = [line for line in result.stdout.splitlines() if "::" in line]
    order = list(dict.fromkeys(nodeid.split("::")[0] for nodeid in nodeids))
    assert order == ["tests/integration/test_studies_quick.py", "tests/e2e/test_rl_resume.py",
                     "tests/integration/test_rl_loop.py", "tests/distributed/test_dp_dispatch.py", "tests/unit/test_tiers.py"]
    alone = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", modules[0]],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert [line for line in nodeids if line.startswith(modules[0])] == \
        [line for line in alone.stdout.splitlines() if "::" in line]  # a module's own order is kept
