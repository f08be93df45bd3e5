"""Pre-flight of ``score``: input, output and reward config, before any sample is scored.

:func:`preflight_score` checks that the input file exists and holds at least one non-blank line,
that the output is not the input (also through links), not a directory, and that its directory
exists, and that the reward YAML loads with every scorer what it claims to be. It returns the
reward config. It writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_rlhf.config.errors import MissingInput, UserError
from megatron_rlhf.preflight.checks import check_output_file, check_reward_config


def preflight_score(input_path: str, output_path: str, reward_config: str | None) -> Any:
    """The RewardConfig to score with; UserError naming the option and the value otherwise."""
    path = Path(input_path)
    if not path.is_file():
        raise MissingInput(f"--input {input_path} does not exist")
    with path.open("rb") as handle:
        if not any(line.strip() for line in handle):
            raise UserError(f"--input {input_path} holds no sample (the file is empty or blank)")
    check_output_file(output_path, [input_path], "--output")
    return check_reward_config(reward_config, "--config")
