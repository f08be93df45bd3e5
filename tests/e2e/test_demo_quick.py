"""The main job runs in CI: `megatron-rlhf demo --quick --with-genrm`, as a user types it.

One run covers every stage of the demo at toy size, the GenRM ones included (``--with-genrm``
adds stages; it removes none): the command runs in its own process (a fresh interpreter, its own
process group) with a run tag in its environment, as `tests/e2e/test_rl_resume.py` runs
`train-rl`, so the test can find every process the demo started (Ray's workers, vLLM's engines)
and say whether one outlived it.

Properties (one run, checked in turn):

- the command exits 0 and prints its summary line last, with the numbers of ``report.json``;
- every stage of :meth:`DemoConfig.stages` wrote its result file, and ``report.md`` plus the plots
  exist;
- the report's numbers come from this run: the held-out accuracies are those the evaluation
  stages wrote, the RL metrics file logged every step, and the per-source contributions are the
  sums of the logged ``source/<name>/count|mean``;
- the GenRM judged samples in RL (its count > 0, next to the verifiers and the reward model),
  against the reward model's Best-of-N references (every general RL prompt has one), and no
  sample was an infra error (an unreadable judgement would be one);
- nothing is left running: no process carries the run's tag once the command returned, no
  shared-memory segment or semaphore appeared that no live process maps, and no vLLM IPC ledger
  of an engine the run started (its owner pid carried the tag) outlived it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.e2e.leaks import TAG_ENV, TaggedPids, orphaned_ipc_objects, tagged_processes

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]

TIMEOUT_SECONDS = 840
"""Below the suite's per-test limit (`scripts/run_tests.sh`: --timeout=900), so a stuck demo is
reported with its output rather than cut off by pytest-timeout."""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the demo once; yields (output folder, printed output, processes left, orphaned IPC objects)."""
    out = tmp_path_factory.mktemp("demo_quick") / "demo"
    before = orphaned_ipc_objects()
    env = dict(os.environ)
    env[TAG_ENV] = uuid.uuid4().hex  # inherited by every process the demo starts
    process = subprocess.Popen(
        [sys.executable, "-m", "megatron_rlhf", "demo", "--quick", "--with-genrm", "--out", str(out)],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tagged = TaggedPids(env[TAG_ENV])
    tagged.start()
    try:
        output, _ = process.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    finally:
        tagged.stop()
    left = [pid for pid in tagged_processes(env[TAG_ENV]) if pid != process.pid]
    orphans = orphaned_ipc_objects(tagged.pids | {process.pid}) - before
    for pid in left:  # checked below; not left for the next test
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = output.decode(errors="replace")
    assert process.returncode == 0, f"demo exited {process.returncode}:\n{text[-6000:]}"
    yield out, text, left, orphans


def _stage(out: Path, name: str) -> dict:
    return json.loads((out / "stages" / f"{name}.json").read_text())


def test_every_stage_wrote_its_result_and_the_summary_is_the_reports(demo_run) -> None:
    from megatron_rlhf.demo import DemoConfig

    out, text, _, _ = demo_run
    config = DemoConfig(**json.loads((out / "demo_config.json").read_text()))
    assert config.with_genrm and "genrm" in config.stages() and "bon_reference" in config.stages()
    missing = [name for name in config.stages() if not (out / "stages" / f"{name}.json").is_file()]
    assert not missing, f"stages without a result: {missing}"
    report = _stage(out, "report")
    assert (out / "report.md").is_file() and list((out / "plots").glob("*.png"))
    assert Path(report["report"]) == out / "report.md"
    last = text.strip().splitlines()[-1]
    assert last == (f"math_accuracy_sft={report['math_accuracy_sft']:.3f} "
                    f"math_accuracy_rl={report['math_accuracy_rl']:.3f} report={report['report']}")
    assert set(report["stage_seconds"]) == set(config.stages()) - {"report"}


def test_the_reports_numbers_come_from_this_run(demo_run) -> None:
    from megatron_rlhf.demo_genrm import source_contributions
    from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl

    out, _, _, _ = demo_run
    report, config = _stage(out, "report"), json.loads((out / "demo_config.json").read_text())
    for stage in ("eval_sft", "eval_rl"):
        assert report["held_out"][stage] == _stage(out, stage)["domains"]
    assert report["math_accuracy_sft"] == _stage(out, "eval_sft")["domains"]["math"]["sampled_accuracy"]
    assert report["math_accuracy_rl"] == _stage(out, "eval_rl")["domains"]["math"]["sampled_accuracy"]
    metrics = read_metrics_jsonl(_stage(out, "rl")["metrics"])
    assert [row["step"] for row in metrics] == list(range(config["rl_steps"]))
    assert report["reward_sources"] == json.loads(json.dumps(source_contributions(metrics)))
    markdown = (out / "report.md").read_text()
    for name, values in report["reward_sources"].items():
        assert f"| {name} | {values['samples']} | {values['mean_reward']:.3f} |" in markdown


def test_genrm_judged_rl_samples_against_best_of_n_references(demo_run) -> None:
    from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl

    out, _, _, _ = demo_run
    genrm, bon = _stage(out, "genrm"), _stage(out, "bon_reference")
    assert genrm["steps"] > 0 and Path(genrm["judge"], "config.json").is_file()
    assert genrm["truncated"] == 0  # a judge conversation cut on the right loses its verdict
    assert bon["general_prompts"] > 0 and bon["with_reference"] == bon["general_prompts"]
    sources = _stage(out, "report")["reward_sources"]
    assert {"math", "code", "genrm", "reward_model"} <= set(sources), sources
    assert all(sources[name]["samples"] > 0 for name in ("genrm", "reward_model", "math", "code")), sources
    assert sources["genrm"]["samples"] == sources["reward_model"]["samples"]  # both score every general sample
    assert 0.0 <= sources["genrm"]["mean_reward"] <= 1.0
    metrics = read_metrics_jsonl(_stage(out, "rl")["metrics"])
    assert all(row["reward/infra_errors"] == 0 for row in metrics), metrics


def test_nothing_is_left_running(demo_run) -> None:
    _, _, left, orphans = demo_run
    assert left == [], f"processes of the demo still running after it returned: {left}"
    assert orphans == set(), f"IPC objects the demo left: {sorted(orphans)}"
