"""Fault injection for the resume tests: ``MEGATRON_RLHF_FAULT`` kills a run's process group at a
chosen phase of a chosen step, as a crash of the node would.

:func:`fault_hook_from_env` turns the variable into the phase hook :func:`~megatron_rlhf.trainer.rl_loop.run_rl`
calls at the start of every step phase and checkpoint; with the variable unset there is no hook
and nothing is killed. A malformed value is an error naming it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

FAULT_ENV = "MEGATRON_RLHF_FAULT"
"""Fault injection for resume tests: ``<phase>@<step>[+<seconds>]`` SIGKILLs this process group
``seconds`` after ``phase`` (a step phase, or ``checkpoint``) first starts at a step >= ``step``
(a resumed run may start past ``step``). Never set it in a real run: it kills every process of
the group, as a crash of the node would."""


def fault_hook_from_env() -> Any:
    """The phase hook :data:`FAULT_ENV` asks for, or None."""
    import signal
    import threading
    import time

    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    try:
        phase, rest = spec.split("@")
        step_text, _, delay_text = rest.partition("+")
        target, delay = int(step_text), float(delay_text or 0.0)
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <phase>@<step>[+<seconds>]") from None

    def kill() -> None:
        time.sleep(delay)
        log.warning("%s: killing process group %d", FAULT_ENV, os.getpgrp())
        os.killpg(os.getpgrp(), signal.SIGKILL)

    fired = []

    def hook(name: str, step: int) -> None:
        if name == phase and step >= target and not fired:
            fired.append(step)
            threading.Thread(target=kill, daemon=True).start()

    return hook
