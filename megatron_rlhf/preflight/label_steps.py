"""Pre-flight of ``label-steps``: everything it reads, before vLLM starts or any prefix is rolled out.

:func:`preflight_label_steps` checks the output file can be appended to without touching the input
(not the input itself, not a directory, its directory exists), the policy is a Hugging Face model
with a tokenizer whose position limit fits ``--max-model-len``, and ``--max-new-tokens`` leaves
room for a prompt. The input file and the reward routes are checked by the command itself, also
before the engine starts (they need the step separator). It creates nothing and starts nothing.
"""

from __future__ import annotations

from typing import Any

from megatron_rlhf.config.errors import UserError
from megatron_rlhf.preflight.checks import check_hf_model_dir, check_length_fits, check_output_file


def preflight_label_steps(args: Any) -> None:
    """Check the parsed ``label-steps`` arguments; UserError naming the option and value."""
    check_output_file(args.output, [args.input], "--output")
    if args.max_new_tokens >= args.max_model_len:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in "
                        f"--max-model-len {args.max_model_len}")
    policy = check_hf_model_dir(args.policy, "--policy")
    check_length_fits(policy, args.policy, args.max_model_len, "--max-model-len")
