"""Per-step metrics of an RL run: console progress, JSONL, TensorBoard, optional Weights & Biases.

:class:`MetricsLogger` receives one flat ``{name: number}`` dict per RL step (names such as
``reward/math``, ``kl``, ``time/rollout``) and writes it to every enabled sink:

- console: a tqdm progress bar over RL steps whose postfix shows a few chosen metrics, plus one
  compact log line per step (written through ``tqdm.write`` so the bar stays intact);
- JSONL: ``<output_dir>/metrics.jsonl``, one object per step ``{"step", "time", **metrics}``,
  appended and flushed at every step, so a crash loses at most the step being written;
- TensorBoard: scalars under ``<output_dir>/tensorboard`` (``torch.utils.tensorboard``);
- Weights & Biases: only when ``MetricsLogConfig.wandb`` is set; if the ``wandb`` package is not
  installed the config itself raises a ValueError saying so.

:class:`PhaseTimer` times the named phases of a step (``with timer.phase("rollout"):``) and hands
back ``{"time/<phase>": seconds}`` to log with the step's metrics;
:func:`seconds_since_process_start` gives ``time/to_first_step``.

Resume: ``MetricsLogger(config, resume_step=k)`` keeps JSONL entries with ``step <= k`` and drops
later ones (they were written after the checkpoint being resumed), rewriting the file atomically;
TensorBoard is opened with ``purge_step=k + 1`` so its viewer hides the stale events. A fresh run
(``resume_step=None``) starts an empty JSONL file and purges every earlier TensorBoard event.

Guarantees: steps logged by one logger strictly increase; JSONL is strict JSON (NaN and +-Inf are
written as ``null``; TensorBoard receives the real value; ``None`` values are written as ``null``
and skipped by TensorBoard and W&B). Not guaranteed: Weights & Biases cannot rewind a run, so after
a resume it may drop or duplicate the steps past the checkpoint; the logger is not process-safe
(build it in the one process that logs, e.g. the Ray driver or rank 0).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl

WANDB_MODES = ("online", "offline")
RESERVED_KEYS = ("step", "time")


@dataclass(frozen=True)
class MetricsLogConfig:
    """Where and how the per-step metrics of a run are written."""

    output_dir: str
    """Directory that receives ``jsonl_filename`` and ``tensorboard_subdir``; created if missing."""

    console: bool = True
    """Show a tqdm progress bar over RL steps and print one compact line per step."""

    console_keys: tuple[str, ...] = ("reward/mean", "kl", "entropy", "response_length/mean")
    """Metrics shown in the progress-bar postfix and the per-step line (those present in a step)."""

    total_steps: int | None = None
    """RL steps of the whole run (the bar's length); None = a bar without a total. >= 1."""

    jsonl: bool = True
    """Append one JSON object per step to ``output_dir/jsonl_filename``."""

    jsonl_filename: str = "metrics.jsonl"
    """File name (no directory part) of the JSONL log inside ``output_dir``."""

    tensorboard: bool = True
    """Write TensorBoard scalars under ``output_dir/tensorboard_subdir``."""

    tensorboard_subdir: str = "tensorboard"
    """Sub-directory (relative) of ``output_dir`` for TensorBoard event files."""

    wandb: bool = False
    """Also log to Weights & Biases; needs the ``wandb`` package (checked here, at construction)."""

    wandb_project: str = "megatron-rlhf"
    """W&B project name; non-empty."""

    wandb_run_name: str | None = None
    """W&B run display name; None = W&B chooses."""

    wandb_run_id: str | None = None
    """W&B run id; give the same id on resume to continue the same run. None = a new run."""

    wandb_mode: str = "online"
    """"online" (sync while training) or "offline" (write locally, ``wandb sync`` later)."""

    def __post_init__(self) -> None:
        _check_output_dir(self.output_dir)
        _check_total_steps(self.total_steps)
        _check_relative_name("jsonl_filename", self.jsonl_filename, allow_subdirs=False)
        _check_relative_name("tensorboard_subdir", self.tensorboard_subdir, allow_subdirs=True)
        _check_wandb(self)


def _check_output_dir(output_dir: str) -> None:
    if not isinstance(output_dir, str | os.PathLike) or not str(output_dir):
        raise ValueError(f"MetricsLogConfig.output_dir={output_dir!r} must be a non-empty path")


def _check_total_steps(total_steps: int | None) -> None:
    if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
        raise ValueError(f"MetricsLogConfig.total_steps={total_steps!r} must be None or an int >= 1")


def _check_relative_name(field: str, value: str, *, allow_subdirs: bool) -> None:
    path = Path(value)
    bad = not value or path.is_absolute() or ".." in path.parts
    if bad or (not allow_subdirs and len(path.parts) != 1):
        kind = "a relative path inside output_dir" if allow_subdirs else "a plain file name"
        raise ValueError(f"MetricsLogConfig.{field}={value!r} must be {kind}")


def _check_wandb(config: MetricsLogConfig) -> None:
    if not config.wandb:
        return
    if config.wandb_mode not in WANDB_MODES:
        raise ValueError(f"MetricsLogConfig.wandb_mode={config.wandb_mode!r} is not one of {WANDB_MODES}")
    if not config.wandb_project:
        raise ValueError("MetricsLogConfig.wandb_project must be non-empty when wandb=True")
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(
            "MetricsLogConfig.wandb=True but the `wandb` package is not installed in "
            f"{sys.prefix}; install it (pip install wandb) or set wandb=False"
        )


def _truncate_jsonl_after(path: Path, last_kept_step: int | None) -> int:
    """Rewrite ``path`` atomically, keeping records with step <= ``last_kept_step``; returns their count."""
    if not path.exists():
        return 0
    kept = (
        [] if last_kept_step is None else [r for r in read_metrics_jsonl(path) if r["step"] <= last_kept_step]
    )
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for record in kept:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
    os.replace(temporary, path)
    return len(kept)


def _as_number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if callable(getattr(value, "item", None)):  # torch / numpy scalars
        size = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", 1)
        if size != 1:
            raise ValueError(f"metric {name!r} must be a scalar; got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"metric {name!r} must be a number or None; got {type(value).__name__} {value!r}")
    return float(value)


def _compact(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


class MetricsLogger:
    """Writes one record per RL step to the sinks enabled in a :class:`MetricsLogConfig`.

    Use as a context manager, or call :meth:`close` at the end of the run.
    """

    def __init__(
        self,
        config: MetricsLogConfig,
        *,
        resume_step: int | None = None,
        run_config: Mapping[str, Any] | None = None,
        console_stream: TextIO | None = None,
    ) -> None:
        """
        Args:
            config: the sinks and their settings.
            resume_step: last step of the checkpoint being resumed (entries after it are dropped);
                None for a fresh run.
            run_config: the run's configuration, recorded by W&B (JSON-serialisable).
            console_stream: where the bar and the step lines go; default ``sys.stderr``.
        """
        if resume_step is not None and (not isinstance(resume_step, int) or resume_step < 0):
            raise ValueError(f"MetricsLogger: resume_step={resume_step!r} must be None or an int >= 0")
        self.config = config
        self.last_step = resume_step
        output_dir = Path(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = output_dir / config.jsonl_filename
        self.tensorboard_dir = output_dir / config.tensorboard_subdir
        self._stream = console_stream if console_stream is not None else sys.stderr
        self._jsonl: TextIO | None = None
        self._tensorboard = None
        self._wandb_run = None
        self._progress = None
        try:
            self._open_sinks(resume_step, run_config)
        except BaseException:
            self.close()  # no half-open sinks left behind
            raise

    def _open_sinks(self, resume_step: int | None, run_config: Mapping[str, Any] | None) -> None:
        config = self.config
        steps_done = 0  # the bar's start: steps already in the log (0- or 1-based numbering alike)
        if config.jsonl:
            steps_done = _truncate_jsonl_after(self.jsonl_path, resume_step)
            self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge_step = 0 if resume_step is None else resume_step + 1
            self._tensorboard = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=purge_step)
        if config.wandb:
            self._wandb_run = self._start_wandb(run_config, resume_step)
        if config.console:
            from tqdm import tqdm

            self._progress = tqdm(
                total=config.total_steps,
                initial=steps_done,
                desc="RL steps",
                unit="step",
                file=self._stream,
                dynamic_ncols=True,
                mininterval=0,
            )

    def _start_wandb(self, run_config: Mapping[str, Any] | None, resume_step: int | None) -> Any:
        try:
            wandb = importlib.import_module("wandb")
        except ImportError as error:
            raise ValueError(
                f"MetricsLogConfig.wandb=True but `import wandb` failed ({error}); "
                "install it (pip install wandb) or set wandb=False"
            ) from error
        config = self.config
        return wandb.init(
            project=config.wandb_project,
            name=config.wandb_run_name,
            id=config.wandb_run_id,
            resume="allow" if resume_step is not None else None,
            mode=config.wandb_mode,
            dir=config.output_dir,
            config=dict(run_config or {}),
        )

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | None]:
        """Write the metrics of RL step ``step`` to every sink; returns them as floats.

        Raises ValueError for a step that does not follow the last one logged (or resumed), a
        reserved or empty key, or a value that is not a number/None.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"MetricsLogger.log: step={step!r} must be an int >= 0")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"MetricsLogger.log: step {step} does not follow the last logged step {self.last_step}"
            )
        values: dict[str, float | None] = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or not name or name in RESERVED_KEYS:
                raise ValueError(
                    f"MetricsLogger.log: metric name {name!r} is empty or reserved {RESERVED_KEYS}"
                )
            values[name] = _as_number(name, value)
        self.last_step = step
        self._write_jsonl(step, values)
        self._write_tensorboard(step, values)
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in values.items() if v is not None}, step=step)
        self._write_console(step, values)
        return values

    def _write_jsonl(self, step: int, values: Mapping[str, float | None]) -> None:
        if self._jsonl is None:
            return
        finite = {k: (v if v is not None and math.isfinite(v) else None) for k, v in values.items()}
        record = {"step": step, "time": round(time.time(), 3), **finite}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()

    def _write_tensorboard(self, step: int, values: Mapping[str, float | None]) -> None:
        if self._tensorboard is None:
            return
        for name, value in values.items():
            if value is not None:
                self._tensorboard.add_scalar(name, value, global_step=step)
        self._tensorboard.flush()

    def _write_console(self, step: int, values: Mapping[str, float | None]) -> None:
        if self._progress is None:
            return
        shown = {k: _compact(values[k]) for k in self.config.console_keys if k in values}
        self._progress.set_postfix(shown, refresh=False)
        self._progress.update(1)
        total = f"/{self.config.total_steps}" if self.config.total_steps else ""
        fields = " ".join(f"{k}={v}" for k, v in shown.items())
        seconds = values.get("time/step")
        timing = f" ({seconds:.1f}s)" if seconds is not None else ""
        self._progress.write(f"step {step}{total}{timing} {fields}".rstrip(), file=self._stream)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_IMPORTED_AT = time.time()


def seconds_since_process_start() -> float:
    """Wall seconds since this process (the command) started, from the OS's record of its
    creation (``psutil``); since this module was imported when ``psutil`` is missing. The RL
    loop logs it after its first step as ``time/to_first_step``."""
    try:
        import psutil
    except ImportError:
        return time.time() - _IMPORTED_AT
    return time.time() - psutil.Process().create_time()


class PhaseTimer:
    """Wall-clock time of the named phases of one step, e.g. ``with timer.phase("rollout"):``.

    A phase entered several times in a step accumulates; phases may nest under different names
    (the outer time includes the inner). :meth:`pop_step` returns ``{"time/<phase>": seconds,
    "time/step": seconds since the previous pop}`` and starts the next step. On GPUs pass
    ``synchronize=torch.cuda.synchronize`` so that queued kernels are counted in their phase.
    """

    def __init__(
        self,
        *,
        synchronize: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._synchronize = synchronize
        self._clock = clock
        self._totals: dict[str, float] = {}
        self._active: set[str] = set()
        self._step_start = clock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as phase ``name`` (non-empty, not already running)."""
        if not name or "/" in name:
            raise ValueError(f"PhaseTimer.phase: name {name!r} must be non-empty and contain no '/'")
        if name in self._active:
            raise ValueError(f"PhaseTimer.phase: phase {name!r} is already running (nested in itself)")
        self._active.add(name)
        if self._synchronize is not None:
            self._synchronize()
        start = self._clock()
        try:
            yield
        finally:
            if self._synchronize is not None:
                self._synchronize()
            self._totals[name] = self._totals.get(name, 0.0) + self._clock() - start
            self._active.discard(name)

    def pop_step(self) -> dict[str, float]:
        """Timings of the step just finished, as ``time/<phase>`` metrics; resets for the next step."""
        if self._active:
            raise ValueError(f"PhaseTimer.pop_step: phases {sorted(self._active)} are still running")
        now = self._clock()
        timings = {f"time/{name}": seconds for name, seconds in self._totals.items()}
        timings["time/step"] = now - self._step_start
        self._totals = {}
        self._step_start = now
        return timings
