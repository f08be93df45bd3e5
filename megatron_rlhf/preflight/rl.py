"""Pre-flight of ``train-rl``: the whole run configuration, before Ray, vLLM or Megatron start.

:func:`preflight_rl` takes the typed run configuration (an ``RLConfig``, already strictly typed
by ``config.typed_load``, its reward YAML already parsed into a ``RewardConfig`` and its
curriculum into a ``CurriculumConfig``) and checks, in this order: the output directory can be
created; the policy (and critic) directories are Hugging Face models with a tokenizer; the
requested lengths fit the policy's position limit; each scorer of the reward config is what it
claims (train-rm checkpoints, judge models); every prompt file parses strictly (the first
malformed line stops, ``file:line``) and every prompt's domain has a reward route; the
curriculum names only domains that have prompts. It reads no config file again, creates nothing
and starts nothing.

Not checked: what needs the tokenizer over every prompt (over-long prompts are skipped and
reported by the loader), memory, and the layouts the planner checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_rlhf.config.errors import UserError
from megatron_rlhf.data.curriculum import CurriculumConfig, domain_probabilities
from megatron_rlhf.preflight.checks import (
    check_hf_model_dir,
    check_length_fits,
    check_output_dir,
    check_prompt_files,
    check_reward_scorers,
)


def preflight_rl(config: Any, where: str) -> None:
    """Check the RL run ``config`` read from ``where`` (the YAML path); UserError naming the key."""
    from megatron_rlhf.planning.fit_check import check_rl_config_fits

    fit = getattr(config, "fit_check", None)
    if (fit is not None and fit.hf_config is not None) or (Path(config.policy_dir) / "config.json").is_file():
        check_rl_config_fits(config)  # layout and GPU memory first: they need only the architecture
    check_output_dir(config.out_dir, f"{where}: out_dir")
    policy = check_hf_model_dir(config.policy_dir, f"{where}: policy_dir")
    if config.critic_dir is not None:
        check_hf_model_dir(config.critic_dir, f"{where}: critic_dir")
    check_length_fits(policy, config.policy_dir, config.max_prompt_tokens + config.max_new_tokens,
                      f"{where}: max_prompt_tokens + max_new_tokens")
    reward = config.reward_config
    check_reward_scorers(reward)
    routes = reward.origin or "the default reward config (one verifier per verifiable domain)"
    domains = check_prompt_files(config.prompt_files, f"{where}: prompt_files", reward.router, routes)
    if config.curriculum is not None:
        check_curriculum(config.curriculum, domains, f"{where}: curriculum")


def check_curriculum(curriculum: CurriculumConfig, domains: dict[str, int], where: str) -> None:
    """The phases of the typed ``curriculum`` name only domains that have prompts."""
    for index, phase in enumerate(curriculum.phases):
        try:
            domain_probabilities(phase, domains)
        except ValueError as error:
            raise UserError(f"{where}: phase {index}: {error}") from None
