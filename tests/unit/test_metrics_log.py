"""MetricsLogger sinks (JSONL, TensorBoard, console), resume truncation, the W&B guard, PhaseTimer."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_rlhf.trainer.metrics_log import (
    MetricsLogConfig,
    MetricsLogger,
    PhaseTimer,
    read_metrics_jsonl,
)


def _tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def _log_steps(config: MetricsLogConfig, steps: range, *, resume_step: int | None = None) -> str:
    console = io.StringIO()
    with MetricsLogger(config, resume_step=resume_step, console_stream=console) as logger:
        for step in steps:
            logger.log(
                step, {"reward/math": 0.1 * step, "kl": float("nan"), "time/step": 1.5, "skipped": None}
            )
    return console.getvalue()


def test_jsonl_tensorboard_and_console_are_written_and_readable(tmp_path: Path) -> None:
    config = MetricsLogConfig(
        output_dir=str(tmp_path / "run"), total_steps=3, console_keys=("reward/math", "kl")
    )
    console = _log_steps(config, range(1, 4))

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]  # strict JSON: NaN written as null
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["reward/math"] == pytest.approx(0.2)
    assert records[1]["kl"] is None and records[1]["skipped"] is None
    assert read_metrics_jsonl(tmp_path / "run" / "metrics.jsonl") == records

    tensorboard_dir = tmp_path / "run" / "tensorboard"
    assert list(tensorboard_dir.glob("events.out.tfevents.*"))
    reward = _tensorboard_scalars(tensorboard_dir, "reward/math")
    assert [step for step, _ in reward] == [1, 2, 3]
    assert [value for _, value in reward] == pytest.approx([0.1, 0.2, 0.3])
    assert all(math.isnan(value) for _, value in _tensorboard_scalars(tensorboard_dir, "kl"))

    for step in (1, 2, 3):
        assert f"step {step}/3 (1.5s) reward/math=" in console
    assert "3/3" in console  # the progress bar reached the total


def test_resume_truncates_entries_after_the_resumed_step(tmp_path: Path) -> None:
    config = MetricsLogConfig(output_dir=str(tmp_path), console=False)
    _log_steps(config, range(1, 6))
    with MetricsLogger(config, resume_step=3) as logger:
        assert [r["step"] for r in read_metrics_jsonl(logger.jsonl_path)] == [1, 2, 3]
        with pytest.raises(ValueError, match="step 3 does not follow the last logged step 3"):
            logger.log(3, {"reward/math": 9.0})
        logger.log(4, {"reward/math": 40.0})

    records = read_metrics_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward/math"]) for r in records] == [
        (1, 0.1),
        (2, 0.2),
        (3, pytest.approx(0.3)),
        (4, 40.0),
    ]
    # TensorBoard hides the stale steps 4 and 5 of the first run (purge_step = 4)
    assert _tensorboard_scalars(tmp_path / "tensorboard", "reward/math")[-2:] == [
        (3, pytest.approx(0.3)),
        (4, 40.0),
    ]
    assert len(_tensorboard_scalars(tmp_path / "tensorboard", "reward/math")) == 4


def test_resumed_progress_bar_starts_at_the_steps_already_logged(tmp_path: Path) -> None:
    config = MetricsLogConfig(output_dir=str(tmp_path), total_steps=6, tensorboard=False)
    _log_steps(config, range(6))  # 0-based steps 0..5
    console = _log_steps(config, range(3, 6), resume_step=2)  # steps 0, 1, 2 kept
    assert "| 3/6 " in console and "| 6/6 " in console
    assert "| 2/6 " not in console


def test_fresh_run_in_an_existing_directory_starts_an_empty_log(tmp_path: Path) -> None:
    config = MetricsLogConfig(output_dir=str(tmp_path), console=False, tensorboard=False)
    _log_steps(config, range(0, 4))
    _log_steps(config, range(0, 2))
    assert [r["step"] for r in read_metrics_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]


def test_torn_last_line_is_dropped_and_a_bad_middle_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kl": 0.1}\n{"step": 2, "kl"')
    config = MetricsLogConfig(output_dir=str(tmp_path), console=False, tensorboard=False)
    MetricsLogger(config, resume_step=5).close()
    assert path.read_text() == '{"step": 1, "kl": 0.1}\n'

    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not a JSON object")):
        MetricsLogger(config, resume_step=5)


def test_wandb_enabled_without_wandb_installed_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail whether or not installed
    with pytest.raises(
        ValueError, match=r"wandb=True but the `wandb` package is not installed.*set wandb=False"
    ):
        MetricsLogConfig(output_dir=str(tmp_path), wandb=True)
    MetricsLogConfig(output_dir=str(tmp_path), wandb=False)  # disabled: no check


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"total_steps": 0}, "total_steps=0"),
        ({"jsonl_filename": "sub/metrics.jsonl"}, "jsonl_filename='sub/metrics.jsonl'"),
        ({"tensorboard_subdir": "../elsewhere"}, "tensorboard_subdir='../elsewhere'"),
        ({"output_dir": ""}, "output_dir=''"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, overrides: dict, message: str) -> None:
    settings = {"output_dir": str(tmp_path), **overrides}
    with pytest.raises(ValueError, match=message):
        MetricsLogConfig(**settings)


def test_bad_metric_values_are_rejected(tmp_path: Path) -> None:
    config = MetricsLogConfig(output_dir=str(tmp_path), console=False, tensorboard=False)
    with MetricsLogger(config) as logger:
        with pytest.raises(ValueError, match="metric 'answer' must be a number"):
            logger.log(1, {"answer": "42"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 1.0})
        assert logger.log(1, {"loss": torch.tensor(0.25)}) == {"loss": 0.25}


def test_phase_timer_accumulates_phases_per_step() -> None:
    ticks = iter([0.0, 1.0, 3.0, 4.0, 4.5, 10.0, 10.0, 11.0, 12.0])
    timer = PhaseTimer(clock=lambda: next(ticks))  # construction reads 0.0
    with timer.phase("rollout"):  # 1.0 -> 3.0
        pass
    with timer.phase("update"):  # 4.0 -> 4.5
        pass
    assert timer.pop_step() == {"time/rollout": 2.0, "time/update": 0.5, "time/step": 10.0}
    with timer.phase("rollout"):  # 10.0 -> 11.0
        with pytest.raises(ValueError, match="already running"):
            with timer.phase("rollout"):
                pass
    assert timer.pop_step() == {"time/rollout": 1.0, "time/step": 2.0}
