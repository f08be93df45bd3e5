"""trainer/metrics_log.seconds_since_process_start: the command's age, read from the OS."""

from __future__ import annotations

import time


def test_counts_from_the_process_start_not_from_the_call():
    import psutil

    from megatron_rlhf.trainer.metrics_log import seconds_since_process_start

    before = time.time()
    age = seconds_since_process_start()
    assert age >= before - psutil.Process().create_time() - 1e-3  # at least the process's age at the call
    assert seconds_since_process_start() >= age  # it only grows
