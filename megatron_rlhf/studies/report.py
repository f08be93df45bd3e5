"""One study's report: ``report.md`` (table, trend lines, verdicts), ``report.png`` and ``report.json``.

Everything is rebuilt from the :class:`~megatron_rlhf.studies.runner.StudyResult` the study
computed from its arms' result files, so a resumed study writes the same report as one run in a
single go.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_rlhf.studies.runner import StudyResult


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_report(name: str, result: StudyResult) -> str:
    lines = [f"# Study `{name}`: {result.title}", "", f"Source: {result.source}", ""]
    lines.append("| " + " | ".join(result.columns) + " |")
    lines.append("|" + "---|" * len(result.columns))
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in result.rows]
    lines += ["", "## Trend against the paper's claim", ""]
    for verdict in result.verdicts:
        lines.append(f"- **{verdict.verdict}**: {verdict.claim}. Measured: {verdict.evidence}.")
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def plot_study(result: StudyResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in result.curves.items():
        axes.plot(xs, ys, marker="o", label=label)
    every_x = sorted({x for xs, _ in result.curves.values() for x in xs})
    if result.log_x and every_x and min(every_x) > 0 and len(every_x) > 1:
        axes.set_xscale("log", base=2)
    if every_x:
        axes.set_xticks(every_x, [f"{x:g}" for x in every_x])
    axes.set_xlabel(result.plot_x_label)
    axes.set_ylabel(result.plot_y_label)
    axes.set_title(result.title, fontsize="medium")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_study_report(name: str, result: StudyResult, out_dir: Path) -> dict[str, Path]:
    """Write the three files; returns their paths by kind (md, png, json)."""
    paths = {kind: out_dir / f"report.{kind}" for kind in ("md", "png", "json")}
    paths["md"].write_text(markdown_report(name, result))
    plot_study(result, paths["png"])
    document = {
        "study": name, "title": result.title, "source": result.source, "columns": result.columns,
        "rows": result.rows, "curves": {label: {"x": xs, "y": ys} for label, (xs, ys) in result.curves.items()},
        "verdicts": [verdict.as_dict() for verdict in result.verdicts], "notes": result.notes,
        "arms": result.details,
    }
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    return paths
