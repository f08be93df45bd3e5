"""The quick studies' shared test helpers: `megatron-rlhf study NAME --quick` run as a user runs it,
into one output folder per test module, each study once, for the first test that needs it.

The seven studies are tested by two modules, which pytest-xdist's workers can run side by side
(tests/tiers.py): ``test_studies_quick.py``, the RL studies (``responses-per-prompt``,
``policy-size``, ``ppo-vs-grpo``: real ``run_rl`` arms on the tier's session Ray, with real vLLM
engines) and ``pre-ppo`` (a real multi-task reward model, a real Pre-PPO selection: a vLLM engine
samples every training prompt, the reward model scores the answers in a spawned rank; then two
real RL arms with the reward model in the loop), which share RL arms; and
``test_studies_reward_quick.py``, the three reward-model studies (``rm-data``, ``prm-vs-orm``,
``rm-size``: real `train-rm` runs, real scoring, the real math verifier). The two share nothing
expensive: the base model and data sets each folder's ``shared/`` holds take about a second.

Cost: every RL arm pays its Ray workers and its vLLM engine (about 40 s on two idle cores). The
GRPO arm that ``responses-per-prompt`` (n = rl_n), ``policy-size`` (default size) and
``ppo-vs-grpo`` (``grpo``) each ask for is one keyed run (``StudyContext.shared_arm``): 7 RL arms
asked for, 5 runs. ``pre-ppo`` reuses the folder's base model and RL data (``shared/``) but none
of those runs (its arms train on every domain with the reward model in the loop), so it adds its
reward model, its selection engine and 2 RL runs, all at the smoke size of
``megatron_rlhf.studies.recipe.QUICK``. Measured alone on two idle cores (2026-12-07, one module
after the other): the RL studies with pre-ppo 274 s, the reward-model studies 80 s. At that size
the study's work is negligible; its time is start-up (vLLM engines, spawned Megatron ranks, Ray
worker groups). ``study_seconds.json`` in the output folder records each study's seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

REWARD_STUDIES = ("rm-data", "prm-vs-orm", "rm-size")
RL_STUDIES = ("responses-per-prompt", "policy-size", "ppo-vs-grpo")
VERDICTS = ("holds", "does not hold", "inconclusive")


class QuickStudies:
    """A module's output folder; :meth:`run` runs a study there once (the first test that needs
    it pays for it, so the per-test timeout bounds one study, not all of them)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.seconds: dict[str, float] = {}

    def run(self, name: str) -> Path:
        from megatron_rlhf.cli import main

        if name not in self.seconds:
            started = time.perf_counter()
            assert main(["study", name, "--quick", "--out", str(self.folder)]) == 0
            self.seconds[name] = round(time.perf_counter() - started, 1)
            (self.folder / "study_seconds.json").write_text(json.dumps(self.seconds, indent=2))
        return self.folder


def report_of(studies: QuickStudies, name: str) -> dict[str, Any]:
    return json.loads((studies.run(name) / name / "report.json").read_text())


def check_table_plot_and_verdict(studies: QuickStudies, name: str) -> None:
    """The study's report: a markdown table and trend section, verdicts with evidence, a PNG."""
    folder = studies.run(name) / name
    markdown = (folder / "report.md").read_text()
    assert markdown.count("\n|") >= 3, markdown  # header, rule and at least one row
    assert "## Trend against the paper's claim" in markdown
    report = json.loads((folder / "report.json").read_text())
    assert report["verdicts"] and all(v["verdict"] in VERDICTS and v["evidence"] for v in report["verdicts"])
    png = (folder / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000
