"""benchmarks/grpo_vs_trl_report.py and benchmarks/trl_env.py: the pure pieces of the GRPO vs TRL benchmark."""

from __future__ import annotations

import pytest

from benchmarks.grpo_vs_trl_report import SIDES, last_line, paired_ratios, side_order, summarise
from benchmarks.trl_env import REQUIREMENTS, pinned_version


def test_sides_run_in_abba_order():
    assert side_order(0) == SIDES and side_order(1) == tuple(reversed(SIDES)) and side_order(2) == SIDES


def _run(step_s: float) -> dict:
    return {"step_s": step_s}


def test_ratios_are_paired_within_a_repeat_and_the_last_line_takes_their_median():
    repeats = [{"ours": _run(2.0), "ours_async": _run(1.0), "trl": _run(4.0)},
               {"ours": _run(6.0), "ours_async": _run(3.0), "trl": _run(4.0)},
               {"ours": _run(1.0), "ours_async": _run(1.0), "trl": _run(1.0)}]
    ratios = paired_ratios(repeats)
    assert ratios == {"sync": [0.5, 1.5, 1.0], "async": [0.25, 0.75, 1.0]}
    assert last_line(repeats) == "ours_over_trl_step_time=1.000 async_over_trl_step_time=0.750"


def test_summary_drops_the_warmup_steps():
    steps = [{"step_s": 10.0, "tokens": 8, "eos_fraction": 0.0, "phases": {"rollout": 5.0}},
             {"step_s": 2.0, "tokens": 8, "eos_fraction": 1.0, "phases": {"rollout": 1.0}},
             {"step_s": 4.0, "tokens": 8, "eos_fraction": 0.5, "phases": {"rollout": 3.0}}]
    result = {"side": "ours", "steps": steps, "load_before": (1.0,), "load_after": (2.0,), "wall_s": 9.0,
              "package": "x"}
    summary = summarise(result, warmup=1)
    assert summary["step_s"] == 3.0 and summary["phases"] == {"rollout": 2.0} and summary["eos"] == 0.75
    with pytest.raises(ValueError, match="warmup=3"):
        summarise(result, warmup=3)


def test_trl_version_is_read_from_the_pinned_requirements():
    assert pinned_version("trl") and pinned_version("torch")
    with pytest.raises(ValueError, match="pins no version"):
        pinned_version("no-such-package", REQUIREMENTS)


def test_our_token_budget_is_the_positions_of_one_padded_micro_batch(tmp_path):
    """``--token-budget padded``: micro-batch x (longest prompt as the RL loop renders it +
    max_new_tokens); 0 or --no-packing: none; a bad value is refused by name."""
    import json
    import sys

    from benchmarks.grpo_vs_trl_cpu import _arguments, _token_budget, padded_microbatch_positions
    from megatron_rlhf.data.prompts import count_prompt_tokens, read_prompt_lines
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    policy = make_tiny_hf_model("llama", tmp_path / "policy", seed=0, vocab_size=300,
                                tokenizer=train_tiny_tokenizer(300, seed=0))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text, "domain": "math"}) + "\n"
                               for text in ("What is 1 + 2?", "What is 12 + 13 + 14 + 15?")))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    longest = max(count_prompt_tokens(record, tokenizer) for record in read_prompt_lines(prompts))
    assert padded_microbatch_positions(str(policy), str(prompts), 8, 32) == 8 * (longest + 32)

    def parsed(*argv):
        saved, sys.argv = sys.argv, ["grpo_vs_trl_cpu.py", *argv]
        try:
            return _arguments()
        finally:
            sys.argv = saved

    assert _token_budget(parsed(), str(policy), str(prompts)) == 8 * (longest + 32)
    assert _token_budget(parsed("--token-budget", "0"), str(policy), str(prompts)) == 0
    assert _token_budget(parsed("--no-packing"), str(policy), str(prompts)) == 0
    assert _token_budget(parsed("--token-budget", "500"), str(policy), str(prompts)) == 500
    with pytest.raises(SystemExit):
        parsed("--token-budget", "lots")
