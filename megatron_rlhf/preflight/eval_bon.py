"""Pre-flight of ``eval-bon``: everything it reads, before vLLM starts or any response is sampled.

:func:`preflight_eval_bon` checks the output directory can be created, the policy is a Hugging
Face model whose position limit fits ``--max-model-len`` and ``--max-new-tokens``, the prompt file
parses, every ``rm:`` scorer is a ``train-rm`` checkpoint and every ``genrm:`` judge a Hugging Face
model that fits the same lengths, and the reward config (the grader) loads with a route for every
prompt domain. It creates nothing and starts nothing.
"""

from __future__ import annotations

from typing import Any

from megatron_rlhf.config.errors import UserError
from megatron_rlhf.preflight.checks import (
    check_hf_model_dir,
    check_length_fits,
    check_output_dir,
    check_prompt_files,
    check_reward_config,
)


def preflight_eval_bon(args: Any) -> None:
    """Check the parsed ``eval-bon`` arguments; UserError naming the option and value."""
    from megatron_rlhf.rewards.reward_model_source import check_reward_model_checkpoint

    check_output_dir(args.out, "--out")
    if args.max_new_tokens >= args.max_model_len:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in "
                        f"--max-model-len {args.max_model_len}")
    policy = check_hf_model_dir(args.policy, "--policy")
    check_length_fits(policy, args.policy, args.max_model_len, "--max-model-len")
    for spec in args.scorer:
        if spec.kind == "rm":
            check_reward_model_checkpoint(spec.path, f"--scorer rm:{spec.path}")
        elif spec.kind == "genrm":
            judge = check_hf_model_dir(spec.path, f"--scorer genrm:{spec.path}")
            check_length_fits(judge, spec.path, args.max_model_len, "--max-model-len")
    reward = check_reward_config(args.reward_config, "--reward-config")
    check_prompt_files([args.prompts], "--prompts", reward.router,
                       args.reward_config or "the default reward config (one verifier per verifiable domain)")
