"""write_report: Markdown with the accuracy table, final metrics and config; real PNG plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rlhf.evaluation.report import PLOT_FAMILIES, write_report
from megatron_rlhf.trainer.metrics_log import MetricsLogConfig, MetricsLogger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVALUATIONS = {
    "before RL": {"math": 0.25, "code": 0.125},
    "after RL": {"math": 0.5, "code": 0.375},
}
CONFIG = {"algorithm": {"advantage_estimator": "grpo", "kl_coef": 0.01}, "rollout": {"n": 8}, "seed": 1}


def _write_metrics(run_dir: Path, steps: int) -> Path:
    config = MetricsLogConfig(output_dir=str(run_dir), console=False, tensorboard=False)
    with MetricsLogger(config) as logger:
        for step in range(1, steps + 1):
            logger.log(
                step,
                {
                    "reward/math": 0.1 * step,
                    "reward/code": 0.05 * step,
                    "accuracy/math": 0.2 + 0.01 * step,
                    "reward/infra_errors": 0.0,
                    "kl/mean": 0.001 * step,
                    "kl/coef": 0.01,
                    "entropy/mean": 2.0 - 0.1 * step,
                    "diversity/edit": 0.9 - 0.01 * step,
                    "diversity/distinct_2": None if step == 2 else 0.8,
                    "response/length_mean": 30.0 + step,
                },
            )
    return logger.jsonl_path


def test_report_and_plots_exist_and_markdown_has_the_numbers(tmp_path: Path) -> None:
    metrics = _write_metrics(tmp_path / "run", steps=5)
    report = write_report(tmp_path / "report", metrics, EVALUATIONS, CONFIG)

    expected_plots = {
        "heldout_accuracy",
        "reward",
        "accuracy",
        "kl",
        "entropy",
        "diversity",
        "response_length",
    }
    assert set(report.plots) == expected_plots
    for path in report.plots.values():
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 5_000  # a drawn figure, not an empty canvas

    markdown = report.markdown.read_text()
    assert "| code | 12.5 | 37.5 | +25.0 |" in markdown
    assert "| math | 25.0 | 50.0 | +25.0 |" in markdown
    assert "| **mean over domains** | 18.8 | 43.8 | +25.0 |" in markdown
    assert "Step 5 of 5 logged steps." in markdown
    assert "| reward/math | 0.5 |" in markdown
    assert "| response/length_mean | 35 |" in markdown
    assert "| algorithm.advantage_estimator | `grpo` |" in markdown
    assert "| rollout.n | `8` |" in markdown
    for name in expected_plots:
        assert f"(plots/{name}.png)" in markdown


def test_families_not_logged_are_listed_and_not_drawn(tmp_path: Path) -> None:
    config = MetricsLogConfig(output_dir=str(tmp_path / "run"), console=False, tensorboard=False)
    with MetricsLogger(config) as logger:
        logger.log(1, {"reward/mean": 0.5})
    report = write_report(tmp_path / "report", logger.jsonl_path, {}, {})
    assert set(report.plots) == {"reward"}
    markdown = report.markdown.read_text()
    assert "No held-out evaluation was run." in markdown
    assert "Not logged in this run: score, accuracy, kl, entropy, diversity, response_length." in markdown


def test_bad_inputs_raise_naming_the_value(tmp_path: Path) -> None:
    metrics = _write_metrics(tmp_path / "run", steps=1)
    with pytest.raises(ValueError, match=r"evaluations\['after RL'\]\['math'\]=1.5"):
        write_report(tmp_path / "report", metrics, {"after RL": {"math": 1.5}}, {})
    with pytest.raises(ValueError, match="missing.jsonl"):
        write_report(tmp_path / "report", tmp_path / "missing.jsonl", {}, {})


def test_plot_families_leave_out_other_scales() -> None:
    families = {family.stem: family for family in PLOT_FAMILIES}
    logged = {"kl/mean", "kl/coef", "kl_loss", "klx", "reward/math", "reward/infra_errors", "reward_std"}
    assert families["kl"].keys(logged) == ["kl/mean", "kl_loss"]
    assert families["reward"].keys(logged) == ["reward/math"]


def test_reward_plot_of_a_z_scored_domain_shows_its_raw_score(tmp_path: Path) -> None:
    """The demo's `general` domain is scored by a reward model and z-scored per batch by the router:
    its training reward averages 0 at every step. The report plots the raw score per domain."""
    from types import SimpleNamespace

    from megatron_rlhf.evaluation.metrics_file import read_metrics_jsonl
    from megatron_rlhf.rewards.router import DomainRoute, HybridRewardRouter, RouterConfig
    from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus, Verdict
    from megatron_rlhf.trainer.rl_metrics import _reward_metrics

    class WordCount:  # a learned-score stand-in: any real number per response
        name = "words"

        def score(self, samples):
            return [RewardResult(float(len(s.response.split())), RewardStatus.SCORED, Verdict.OK) for s in samples]

        def close(self):
            pass

    router = HybridRewardRouter(RouterConfig(domains={"general": DomainRoute({"words": 2.0}, "batch_zscore")}),
                                {"words": WordCount()})
    config = MetricsLogConfig(output_dir=str(tmp_path / "run"), console=False, tensorboard=False)
    with MetricsLogger(config) as logger:
        for step in range(3):
            responses = ["a " * (step + 1), "a " * (step + 3)]
            samples = [RewardSample(f"{step}:{i}", "general", "p", text) for i, text in enumerate(responses)]
            prompts = [SimpleNamespace(domain="general")] * len(samples)
            logger.log(step, _reward_metrics(prompts, router.score(samples)))
    records = read_metrics_jsonl(logger.jsonl_path)
    assert [r["reward/general"] for r in records] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert [r["score/general"] for r in records] == pytest.approx([2.0 * (step + 2) for step in range(3)])

    report = write_report(tmp_path / "report", logger.jsonl_path, EVALUATIONS, CONFIG)
    assert {"score", "reward"} <= set(report.plots)
    assert report.plots["score"].read_bytes()[:8] == PNG_SIGNATURE
