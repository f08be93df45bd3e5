"""benchmarks/grpo_vs_trl_report.py and benchmarks/trl_env.py: the pure pieces of the GRPO vs TRL benchmark."""

from __future__ import annotations

import pytest

from benchmarks.grpo_vs_trl_report import SIDES, last_line, paired_ratios, side_order, summarise
from benchmarks.trl_env import REQUIREMENTS, pinned_version


def test_sides_run_in_abba_order():
    assert side_order(0) == SIDES and side_order(1) == tuple(reversed(SIDES)) and side_order(2) == SIDES


def _run(step_s: float) -> dict:
    return {"step_s": step_s}


def test_ratios_are_paired_within_a_repeat_and_the_last_line_takes_their_median():
    repeats = [{"ours": _run(2.0), "ours_async": _run(1.0), "trl": _run(4.0)},
               {"ours": _run(6.0), "ours_async": _run(3.0), "trl": _run(4.0)},
               {"ours": _run(1.0), "ours_async": _run(1.0), "trl": _run(1.0)}]
    ratios = paired_ratios(repeats)
    assert ratios == {"sync": [0.5, 1.5, 1.0], "async": [0.25, 0.75, 1.0]}
    assert last_line(repeats) == "ours_over_trl_step_time=1.000 async_over_trl_step_time=0.750"


def test_summary_drops_the_warmup_steps():
    steps = [{"step_s": 10.0, "tokens": 8, "eos_fraction": 0.0, "phases": {"rollout": 5.0}},
             {"step_s": 2.0, "tokens": 8, "eos_fraction": 1.0, "phases": {"rollout": 1.0}},
             {"step_s": 4.0, "tokens": 8, "eos_fraction": 0.5, "phases": {"rollout": 3.0}}]
    result = {"side": "ours", "steps": steps, "load_before": (1.0,), "load_after": (2.0,), "wall_s": 9.0,
              "package": "x"}
    summary = summarise(result, warmup=1)
    assert summary["step_s"] == 3.0 and summary["phases"] == {"rollout": 2.0} and summary["eos"] == 0.75
    with pytest.raises(ValueError, match="warmup=3"):
        summarise(result, warmup=3)


def test_trl_version_is_read_from_the_pinned_requirements():
    assert pinned_version("trl") and pinned_version("torch")
    with pytest.raises(ValueError, match="pins no version"):
        pinned_version("no-such-package", REQUIREMENTS)
