"""Suite YAML validation (errors name the file and key) and the per-dimension report arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_rlhf.evaluation.ability.grading import TaskScores
from megatron_rlhf.evaluation.ability.report import build_report, policy_labels, render_markdown, write_report
from megatron_rlhf.evaluation.ability.suite import DIMENSIONS, load_suite

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _suite(tmp_path: Path, body: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    for name in ("gsm8k.jsonl", "mmlu.jsonl", "he.jsonl"):
        (tmp_path / "data" / name).write_text("")
    path = tmp_path / "suite.yaml"
    path.write_text(body)
    return path


GOOD = """
name: demo
decoding: {greedy: true, samples: 2, temperature: 0.5, max_new_tokens: 32}
engine: {max_model_len: 512, dtype: float32}
graders:
  code: {sandbox: {max_concurrency: 2}}
tasks:
  gsm8k: {format: gsm8k, path: data/gsm8k.jsonl, dimension: logic}
  mmlu: {format: mmlu, path: data/mmlu.jsonl, dimension: knowledge, limit: 3}
  he: {format: humaneval, path: data/he.jsonl, dimension: coding}
"""


def test_a_suite_resolves_paths_against_its_folder(tmp_path):
    suite = load_suite(_suite(tmp_path, GOOD))
    assert suite.name == "demo" and [task.name for task in suite.tasks] == ["gsm8k", "mmlu", "he"]
    assert suite.tasks[0].path == tmp_path / "data" / "gsm8k.jsonl" and suite.tasks[1].limit == 3
    assert suite.decoding.samples == 2 and suite.engine.dtype == "float32"
    assert suite.dimensions() == ["logic", "coding", "knowledge"]  # the paper's order
    assert [task.grader for task in suite.tasks] == ["math", "multiple_choice", "code"]


@pytest.mark.parametrize("body, message", [
    (GOOD.replace("dimension: logic", "dimension: reasoning"),
     r"suite\.yaml: tasks\.gsm8k\.dimension: 'reasoning' is not a dimension"),
    (GOOD.replace("format: mmlu", "format: arc"), r"suite\.yaml: tasks\.mmlu\.format: unknown format 'arc'"),
    (GOOD.replace("data/he.jsonl", "data/missing.jsonl"), r"suite\.yaml: tasks\.he\.path: .*missing\.jsonl does not exist"),
    (GOOD.replace("samples: 2", "sample: 2"), r"suite\.yaml: decoding: unknown key\(s\) \['sample'\]"),
    (GOOD.replace("greedy: true, samples: 2", "greedy: false, samples: 0"), r"suite\.yaml: decoding: .*nothing would be generated"),
    (GOOD.replace("max_concurrency: 2", "max_concurrency: 0"), r"suite\.yaml: graders\.code\.sandbox: .*max_concurrency"),
    (GOOD.replace("limit: 3", "limit: 0"), r"suite\.yaml: tasks\.mmlu\.limit: must be a positive integer"),
    (GOOD + "extra: 1\n", r"suite\.yaml: unknown key\(s\) \['extra'\]"),
])
def test_suite_errors_name_the_file_and_key(tmp_path, body, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_suite(_suite(tmp_path, body))


def _scores(greedy: float, sampled: float | None = None, items: int = 10) -> TaskScores:
    return TaskScores(greedy_accuracy=greedy, sampled_accuracy=sampled, items=items, dropped=0, infra_errors=0)


def test_dimensions_average_their_tasks_and_deltas_are_second_minus_first(tmp_path):
    body = GOOD + "  math: {format: math, path: data/gsm8k.jsonl, dimension: logic}\n"
    suite = load_suite(_suite(tmp_path, body))
    scores = {
        "base": {"gsm8k": _scores(0.2), "math": _scores(0.4), "mmlu": _scores(0.5), "he": _scores(0.0)},
        "rl": {"gsm8k": _scores(0.6), "math": _scores(0.4), "mmlu": _scores(0.25), "he": _scores(0.5)},
    }
    report = build_report(suite, {"base": "/m/base", "rl": "/m/rl"}, scores, {"he": {"too long": 1}})
    assert report.metric == "greedy_accuracy"
    assert report.dimensions["logic"].scores == pytest.approx({"base": 0.3, "rl": 0.5})
    assert report.dimensions["logic"].delta == pytest.approx(0.2)
    assert report.dimensions["knowledge"].delta == pytest.approx(-0.25)
    assert report.tasks["he"].delta == pytest.approx(0.5) and report.tasks["he"].skipped == {"too long": 1}
    assert report.overall.scores == pytest.approx({"base": (0.3 + 0.0 + 0.5) / 3, "rl": (0.5 + 0.5 + 0.25) / 3})
    assert report.not_measured == [d for d in DIMENSIONS if d not in ("logic", "coding", "knowledge")]
    markdown = render_markdown(report)
    assert "| logic | gsm8k, math | 0.300 | 0.500 | +0.200 |" in markdown
    assert "Not measured (no task in the suite): instruction_following, stem, nlp" in markdown
    paths = write_report(report, tmp_path / "out")
    assert paths["png"].read_bytes().startswith(PNG_SIGNATURE)
    saved = json.loads(paths["json"].read_text())
    assert saved["dimensions"]["knowledge"]["delta"] == pytest.approx(-0.25)
    assert saved["tasks"]["gsm8k"]["scores"]["rl"]["greedy_accuracy"] == 0.6


def test_one_policy_has_no_deltas_and_sampled_metric_without_greedy(tmp_path):
    suite = load_suite(_suite(tmp_path, GOOD.replace("greedy: true", "greedy: false")))
    scores = {"p": {"gsm8k": _scores(0.0, 0.5), "mmlu": _scores(0.0, 0.25), "he": _scores(0.0, 1.0)}}
    report = build_report(suite, {"p": "/m/p"}, scores, {})
    assert report.metric == "sampled_accuracy" and report.dimensions["coding"].scores == {"p": 1.0}
    assert report.overall.delta is None and all(row.delta is None for row in report.tasks.values())
    assert "delta" not in render_markdown(report)


def test_policy_labels_are_distinct():
    assert policy_labels(["/a/base", "/b/rl"]) == ["base", "rl"]
    assert policy_labels(["/a/hf", "/b/hf"]) == ["1:hf", "2:hf"]
