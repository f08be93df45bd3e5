"""The per-dimension report: scores by task and by ability dimension, deltas between two policies.

A dimension's score is the unweighted mean of its tasks' scores (each task counts once, whatever
its size); ``overall`` is the unweighted mean of the measured dimensions. The score is the suite's
headline metric (greedy accuracy, or sampled accuracy when no greedy answer is graded); both
accuracies are kept per task. With two policies the delta is second minus first. Dimensions no
task measures are listed as not measured, never shown as 0.

:func:`write_report` writes ``ability_report.md``, ``ability_report.png`` (bars per dimension and
policy) and ``ability_report.json`` (everything above, machine-readable).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from megatron_rlhf.evaluation.ability.grading import TaskScores
from megatron_rlhf.evaluation.ability.suite import DIMENSIONS, SuiteConfig


@dataclass(frozen=True)
class TaskRow:
    format: str
    dimension: str
    skipped: dict[str, int]
    """Records of the file the loader left out, by reason."""
    scores: dict[str, TaskScores]
    """Policy label -> scores."""
    delta: float | None
    """Second policy's score minus the first's (None: one policy, or a score missing)."""


@dataclass(frozen=True)
class DimensionRow:
    tasks: list[str]
    scores: dict[str, float | None]
    """Policy label -> mean of the tasks' scores."""
    delta: float | None


@dataclass(frozen=True)
class AbilityReport:
    suite: str
    metric: str
    """greedy_accuracy | sampled_accuracy: the score of tasks, dimensions and overall."""
    policies: dict[str, str]
    """Label -> policy directory, in the order given (deltas: last minus first)."""
    tasks: dict[str, TaskRow]
    dimensions: dict[str, DimensionRow]
    """Measured dimensions only, in the paper's order."""
    not_measured: list[str]
    overall: DimensionRow

    def to_json(self) -> dict:
        return asdict(self)


def policy_labels(paths: Sequence[str]) -> list[str]:
    """Short, distinct labels: the directory names (numbered when they coincide)."""
    names = [Path(path).resolve().name or str(path) for path in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{index + 1}:{name}" for index, name in enumerate(names)]


def build_report(suite: SuiteConfig, policies: Mapping[str, str], scores: Mapping[str, Mapping[str, TaskScores]],
                 skipped: Mapping[str, Mapping[str, int]]) -> AbilityReport:
    """``scores``: policy label -> task -> scores; ``skipped``: task -> reason -> count."""
    metric = suite.decoding.metric
    labels = list(policies)
    tasks = {}
    for task in suite.tasks:
        by_policy = {label: scores[label][task.name] for label in labels}
        tasks[task.name] = TaskRow(task.format, task.dimension, dict(skipped.get(task.name, {})), by_policy,
                                   _delta({label: row.score(metric) for label, row in by_policy.items()}, labels))
    dimensions = {}
    for dimension in suite.dimensions():
        names = [task.name for task in suite.tasks if task.dimension == dimension]
        means = {label: _mean([tasks[name].scores[label].score(metric) for name in names]) for label in labels}
        dimensions[dimension] = DimensionRow(names, means, _delta(means, labels))
    overall_scores = {label: _mean([row.scores[label] for row in dimensions.values()]) for label in labels}
    overall = DimensionRow(list(dimensions), overall_scores, _delta(overall_scores, labels))
    not_measured = [dimension for dimension in DIMENSIONS if dimension not in dimensions]
    return AbilityReport(suite.name, metric, dict(policies), tasks, dimensions, not_measured, overall)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _delta(scores: Mapping[str, float | None], labels: Sequence[str]) -> float | None:
    if len(labels) < 2 or scores[labels[0]] is None or scores[labels[-1]] is None:
        return None
    return scores[labels[-1]] - scores[labels[0]]


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def render_markdown(report: AbilityReport) -> str:
    labels = list(report.policies)
    two = len(labels) > 1
    delta_head = [f"delta ({labels[-1]} - {labels[0]})"] if two else []
    lines = [f"# Ability evaluation: {report.suite}", "",
             f"Score: {report.metric.replace('_', ' ')}; a dimension is the mean of its tasks, overall the mean "
             "of the measured dimensions.", ""]
    lines += [f"- `{label}`: {path}" for label, path in report.policies.items()]
    lines += ["", "## By dimension", "", "| dimension | tasks | " + " | ".join(labels + delta_head) + " |",
              "|" + "---|" * (2 + len(labels) + two)]
    for name, row in [*report.dimensions.items(), ("overall", report.overall)]:
        cells = [_cell(row.scores[label]) for label in labels] + ([_cell(row.delta, True)] if two else [])
        shown = f"**{name}**" if name == "overall" else name
        lines.append(f"| {shown} | {', '.join(row.tasks)} | " + " | ".join(cells) + " |")
    if report.not_measured:
        lines += ["", f"Not measured (no task in the suite): {', '.join(report.not_measured)}."]
    accuracy_heads = [f"{label} {kind}" for label in labels for kind in ("greedy", "sampled")]
    lines += ["", "## By task", "",
              "| task | format | dimension | items | " + " | ".join(accuracy_heads + delta_head)
              + " | dropped | infra errors | skipped |",
              "|" + "---|" * (7 + len(accuracy_heads) + two)]
    for name, row in report.tasks.items():
        first = row.scores[labels[0]]
        cells = [_cell(getattr(row.scores[label], f"{kind}_accuracy")) for label in labels for kind in ("greedy", "sampled")]
        cells += [_cell(row.delta, True)] if two else []
        dropped = "/".join(str(row.scores[label].dropped) for label in labels)
        infra = "/".join(str(row.scores[label].infra_errors) for label in labels)
        skipped = "; ".join(f"{reason}: {count}" for reason, count in row.skipped.items()) or "0"
        lines.append(f"| {name} | {row.format} | {row.dimension} | {first.items} | " + " | ".join(cells)
                     + f" | {dropped} | {infra} | {skipped} |")
    return "\n".join(lines) + "\n"


def plot_report(report: AbilityReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*report.dimensions, "overall"]
    rows = [*report.dimensions.values(), report.overall]
    labels = list(report.policies)
    width = 0.8 / len(labels)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 2), 4.5))
    for offset, label in enumerate(labels):
        xs = [index + (offset - (len(labels) - 1) / 2) * width for index in range(len(names))]
        heights = [row.scores[label] or 0.0 for row in rows]
        bars = axes.bar(xs, heights, width, label=label)
        if offset == len(labels) - 1 and len(labels) > 1:
            for bar, row in zip(bars, rows):
                if row.delta is not None:
                    axes.annotate(f"{row.delta:+.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                  ha="center", va="bottom", fontsize=8)
    axes.set_xticks(range(len(names)), [name.replace("_", "\n") for name in names], fontsize=8)
    axes.set_ylim(0, 1.1)
    axes.set_ylabel(report.metric.replace("_", " "))
    axes.set_title(f"Ability evaluation: {report.suite}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: AbilityReport, out_dir: str | Path) -> dict[str, Path]:
    """Write the Markdown, PNG and JSON reports under ``out_dir``; their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"ability_report.{kind}" for kind in ("md", "png", "json")}
    paths["md"].write_text(render_markdown(report))
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    plot_report(report, paths["png"])
    return paths
