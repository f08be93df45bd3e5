"""trainer/startup_timeline.StartupTimeline: when each start-up phase ended, as first-step metrics."""

from __future__ import annotations


def test_phases_are_marked_in_order_as_seconds_since_the_command_started():
    from megatron_rlhf.trainer.metrics_log import seconds_since_process_start
    from megatron_rlhf.trainer.startup_timeline import StartupTimeline

    timeline = StartupTimeline()
    timeline.mark("ray")
    timeline.mark("engine")
    metrics = timeline.metrics()
    assert list(metrics) == ["startup/ray", "startup/engine"]
    assert 0 < metrics["startup/ray"] <= metrics["startup/engine"] <= seconds_since_process_start()
