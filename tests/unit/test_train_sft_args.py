"""`train-sft --packing [--max-tokens-per-microbatch T]` reaches SFTConfig; a budget without
--packing is a user error naming the flag (before any process starts)."""

from __future__ import annotations

import argparse

import pytest

from megatron_rlhf.cli.train_sft import add_arguments, sft_run_config_from_args
from megatron_rlhf.config.errors import UserError

REQUIRED = ["--hf", "model", "--data", "chat.jsonl", "--out", "out"]


def parse(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([*REQUIRED, *extra])


def test_packing_and_budget_reach_the_sft_config():
    config = sft_run_config_from_args(parse("--packing", "--max-tokens-per-microbatch", "64"))
    assert config.sft.packing and config.sft.max_tokens_per_microbatch == 64
    plain = sft_run_config_from_args(parse())
    assert not plain.sft.packing and plain.sft.max_tokens_per_microbatch == 0


@pytest.mark.parametrize("extra", [("--max-tokens-per-microbatch", "64"), ("--packing", "--max-tokens-per-microbatch", "-1")])
def test_a_budget_needs_packing_and_must_not_be_negative(extra):
    with pytest.raises(UserError, match="--max-tokens-per-microbatch"):
        sft_run_config_from_args(parse(*extra))
