"""The report of an RL run: a Markdown summary with PNG training curves.

:func:`write_report` reads the run's metrics JSONL (written by
:class:`megatron_rlhf.trainer.metrics_log.MetricsLogger`) and the held-out evaluations, and writes
into ``out_dir``:

- ``report.md``: held-out accuracy per domain for every evaluation stage (e.g. before and after
  RL) with the change from the first stage to the last and, per stage, the unweighted mean over
  the domains that stage evaluated; the metrics of the last logged step; the run configuration
  flattened to dotted keys;
- ``plots/<family>.png``: one figure per metric family over RL steps, for the families listed in
  :data:`PLOT_FAMILIES` that appear in the log, plus ``plots/heldout_accuracy.png`` (bars per
  domain and stage).

Metric names follow the logger's convention ``family`` or ``family/part``: ``score/math``,
``score/general`` (raw score per domain: what a user reads), ``reward/math`` (the reward training
used, after the router's per-domain normalisation: a z-scored domain averages 0), ``accuracy/math`` (training accuracy), ``kl/mean``,
``entropy/mean``, ``diversity/edit``, ``diversity/distinct_2``, ``response/length_mean``. Each
key matching a :class:`PlotFamily` is drawn as one line of that family's plot.

Guarantees: rendering uses matplotlib's Agg canvas directly (no pyplot state, no display needed);
the same inputs give the same Markdown. Not guaranteed: plots of runs with thousands of metric
keys stay legible; the PNG bytes are identical across matplotlib versions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl


@dataclass(frozen=True)
class PlotFamily:
    """One training-curve figure: every logged key matching ``prefixes`` is one line."""

    stem: str
    """File stem of the PNG (``plots/<stem>.png``) and the plot's name in :class:`RunReport`."""
    title: str
    """Figure title."""
    ylabel: str
    """Y-axis label (quantity and unit)."""
    prefixes: tuple[str, ...]
    """A key ``k`` matches prefix ``p`` when ``k == p`` or ``k`` starts with ``p + "/"``."""
    exclude: tuple[str, ...] = ()
    """Matching keys left out (other units or scales, e.g. a coefficient next to its quantity)."""

    def keys(self, logged: set[str]) -> list[str]:
        """The logged keys drawn in this figure, sorted."""
        matches = (k for k in logged if any(k == p or k.startswith(p + "/") for p in self.prefixes))
        return sorted(k for k in matches if k not in self.exclude)


PLOT_FAMILIES: tuple[PlotFamily, ...] = (
    PlotFamily("score", "Raw score per domain (verifier pass rate, reward-model output)", "mean raw score",
               ("score",)),
    PlotFamily("reward", "Training reward per domain (after the router's normalisation)", "mean reward",
               ("reward",), ("reward/infra_errors",)),
    PlotFamily("accuracy", "Training accuracy per domain", "accuracy", ("accuracy",)),
    PlotFamily("kl", "KL(policy || reference)", "nats per token", ("kl", "kl_loss"), ("kl/coef",)),
    PlotFamily("entropy", "Response entropy", "nats per token", ("entropy",)),
    PlotFamily("diversity", "Response diversity", "diversity", ("diversity",)),
    PlotFamily("response_length", "Response length", "tokens", ("response_length", "response/length_mean")),
)


@dataclass(frozen=True)
class RunReport:
    """Files written by :func:`write_report`."""

    markdown: Path
    """``out_dir/report.md``."""
    plots: dict[str, Path]
    """Plot name (a :data:`PLOT_FAMILIES` stem or ``heldout_accuracy``) -> PNG path; only plots drawn."""


def _check_evaluations(evaluations: Mapping[str, Mapping[str, float]]) -> None:
    for stage, accuracies in evaluations.items():
        if not isinstance(accuracies, Mapping):
            raise ValueError(
                f"evaluations[{stage!r}] must map domain -> accuracy; got {type(accuracies).__name__}"
            )
        for domain, accuracy in accuracies.items():
            if isinstance(accuracy, bool) or not isinstance(accuracy, int | float) or not 0 <= accuracy <= 1:
                raise ValueError(
                    f"evaluations[{stage!r}][{domain!r}]={accuracy!r} must be an accuracy in [0, 1]"
                )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _accuracy_table(evaluations: Mapping[str, Mapping[str, float]]) -> list[str]:
    stages = list(evaluations)
    if not stages:
        return ["No held-out evaluation was run."]
    domains = sorted({domain for accuracies in evaluations.values() for domain in accuracies})
    with_change = len(stages) >= 2
    header = ["domain", *[f"{stage} (%)" for stage in stages]] + (
        [f"change {stages[0]} -> {stages[-1]} (pp)"] if with_change else []
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(domain, [evaluations[s].get(domain) for s in stages]) for domain in domains]
    means = []
    for stage in stages:
        values = list(evaluations[stage].values())
        means.append(sum(values) / len(values) if values else None)
    rows.append(("**mean over domains**", means))
    for name, values in rows:
        cells = [name, *map(_percent, values)]
        if with_change:
            first, last = values[0], values[-1]
            cells.append("-" if first is None or last is None else f"{100 * (last - first):+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _format_metric(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _final_metrics_table(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return ["No RL step was logged."]
    last = records[-1]
    lines = [f"Step {last['step']} of {len(records)} logged steps.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_format_metric(last[k])} |" for k in sorted(last) if k not in ("step", "time")]
    return lines


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _config_table(config_dict: Mapping[str, Any]) -> list[str]:
    flat = _flatten(config_dict)
    if not flat:
        return ["(empty)"]
    lines = ["| key | value |", "|---|---|"]
    for key in sorted(flat):
        text = json.dumps(flat[key], default=str) if not isinstance(flat[key], str) else flat[key]
        lines.append(f"| {key} | `{text.replace('|', '/')}` |")
    return lines


def _new_axes(title: str, ylabel: str, xlabel: str) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _plot_family(records: list[dict[str, Any]], keys: list[str], title: str, ylabel: str, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    figure, axes = _new_axes(title, ylabel, "RL step")
    steps = [record["step"] for record in records]
    for key in keys:
        values = [record.get(key) for record in records]
        series = [math.nan if v is None else float(v) for v in values]
        axes.plot(steps, series, marker="." if len(steps) < 50 else None, label=key)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    figure.savefig(path)


def _plot_heldout(evaluations: Mapping[str, Mapping[str, float]], path: Path) -> None:
    figure, axes = _new_axes("Held-out accuracy per domain", "accuracy", "domain")
    domains = sorted({domain for accuracies in evaluations.values() for domain in accuracies})
    width = 0.8 / max(len(evaluations), 1)
    for index, (stage, accuracies) in enumerate(evaluations.items()):
        positions = [d + (index - (len(evaluations) - 1) / 2) * width for d in range(len(domains))]
        axes.bar(positions, [accuracies.get(domain, math.nan) for domain in domains], width, label=stage)
    axes.set_xticks(range(len(domains)), domains)
    axes.set_ylim(0, 1)
    axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    figure.savefig(path)


def write_report(
    out_dir: str | os.PathLike[str],
    metrics_jsonl: str | os.PathLike[str],
    evaluations: Mapping[str, Mapping[str, float]],
    config_dict: Mapping[str, Any],
) -> RunReport:
    """Write ``report.md`` and ``plots/*.png`` for one run into ``out_dir`` (created if missing).

    Args:
        out_dir: directory of the report.
        metrics_jsonl: the run's metrics log, one ``{"step": int, ...}`` object per line.
        evaluations: held-out accuracy per stage, in display order, e.g.
            ``{"before RL": {"math": 0.25, "code": 0.1}, "after RL": {"math": 0.5, "code": 0.2}}``;
            accuracies in [0, 1]. An empty mapping writes the report without that table.
        config_dict: the run configuration (nested mappings are flattened to dotted keys).

    Raises:
        ValueError: the metrics file is missing or malformed (naming ``file:line``), or an
            accuracy is not a number in [0, 1] (naming the stage and domain).
    """
    metrics_path = Path(metrics_jsonl)
    if not metrics_path.is_file():
        raise ValueError(f"write_report: metrics_jsonl={str(metrics_path)!r} is not a file")
    _check_evaluations(evaluations)
    records = read_metrics_jsonl(metrics_path)
    out = Path(out_dir)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)

    plots: dict[str, Path] = {}
    if evaluations and any(evaluations.values()):
        plots["heldout_accuracy"] = plot_dir / "heldout_accuracy.png"
        _plot_heldout(evaluations, plots["heldout_accuracy"])
    missing = []
    logged = {key for record in records for key in record}
    for family in PLOT_FAMILIES:
        keys = family.keys(logged)
        if not keys:
            missing.append(family.stem)
            continue
        plots[family.stem] = plot_dir / f"{family.stem}.png"
        _plot_family(records, keys, family.title, family.ylabel, plots[family.stem])

    lines = ["# RL run report", "", "## Held-out accuracy per domain", ""]
    lines += _accuracy_table(evaluations)
    lines += ["", "## Final metrics", ""]
    lines += _final_metrics_table(records)
    lines += ["", "## Training curves", ""]
    for name, path in plots.items():
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({path.relative_to(out).as_posix()})", ""]
    if missing:
        lines += [f"Not logged in this run: {', '.join(missing)}.", ""]
    lines += ["## Configuration", ""]
    lines += _config_table(config_dict)
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return RunReport(markdown=markdown, plots=plots)
