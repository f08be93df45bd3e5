"""Start-up timeline of an RL run (:func:`~megatron_rlhf.trainer.rl_loop.run_rl`).

The first step's metrics carry ``startup/<phase>``, the seconds from the command's start to the
end of each start-up phase (``prompts``: config, tokenizer and prompt set; ``ray``; ``workers``:
every group's rank 0 up, its process started and its class imported; ``actor``: the actor's model
built and loaded; ``engine``: the rollout engine started and the weight-transfer group open;
``groups``: every group loaded), next to ``time/to_first_step``; each is also logged."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class StartupTimeline:
    """When each start-up phase ended, in seconds since the command started (module docstring)."""

    def __init__(self) -> None:
        self.ends: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        from megatron_rlhf.trainer.metrics_log import seconds_since_process_start

        self.ends[phase] = seconds_since_process_start()
        log.info("start-up: %s done at %.1f s", phase, self.ends[phase])

    def metrics(self) -> dict[str, float]:
        return {f"startup/{phase}": seconds for phase, seconds in self.ends.items()}
