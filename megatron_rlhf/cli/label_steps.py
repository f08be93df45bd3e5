"""`megatron-rlhf label-steps`: Monte-Carlo step labels for PRM training (the labelling:
:mod:`megatron_rlhf.evaluation.step_labels`).

Exit codes: 0 every solution is labelled (now or by an earlier run); 1 some were skipped (too
long, or ungradable steps; a rerun retries the ungradable ones); 2 a user error (missing file,
malformed input without ``--skip-malformed``, bad value). Building the parser imports nothing
heavy; :func:`run` imports the engine and the verifiers.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Iterable

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="DIR", help="HF model directory of the policy that rolls out")
    parser.add_argument("--input", required=True, metavar="IN.jsonl",
                        help='solutions: {"id", "prompt", "steps": [...], "ground_truth", "domain"?} per line')
    parser.add_argument("--output", required=True, metavar="OUT.jsonl",
                        help="step-labelled records (appended; ids already there are skipped: rerun to resume)")
    parser.add_argument("--rollouts-per-step", type=int, default=8, metavar="M", help="completions per step prefix (default 8)")
    parser.add_argument("--label-type", choices=("soft", "hard"), default="soft",
                        help="soft: fraction of correct completions; hard: 1 if any is correct (default soft)")
    parser.add_argument("--step-separator", default="\n", metavar="TEXT", help="joins the steps (default: newline)")
    parser.add_argument("--prompt-format", choices=("chat", "plain"), default="chat",
                        help="how the policy saw the prompt (default chat: the tokenizer's chat template)")
    parser.add_argument("--final-step", choices=("verify", "rollout"), default="verify",
                        help="label the last step by grading the whole solution (default) or by rolling out")
    parser.add_argument("--prefixes-per-batch", type=int, default=64, metavar="K", help="step prefixes per engine call")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=2048, help="engine context (prompt + completion), tokens")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="vLLM tensor parallel size")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0, help="engine seed")
    parser.add_argument("--reward-config", default=None, metavar="REWARDS.yaml",
                        help="verifiers by domain (default: one verifier per verifiable domain)")
    parser.add_argument("--skip-malformed", action="store_true", help="report malformed input lines and go on")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_verifier(config_path: str | None, domains: Iterable[str]) -> Any:
    """A :class:`HybridRewardRouter` over the routes of ``domains`` only (so unused sandboxes are not
    started). ValueError naming the domains the config cannot route."""
    from dataclasses import replace

    from megatron_rlhf.config.errors import UserError
    from megatron_rlhf.rewards.reward_config import (
        RewardConfig,
        build_sources,
        default_reward_config,
        load_reward_config,
    )
    from megatron_rlhf.rewards.router import HybridRewardRouter

    config = load_reward_config(config_path) if config_path else default_reward_config()
    router = config.router
    wanted = set(domains)
    routes = {domain: route for domain, route in router.domains.items() if domain in wanted}
    unrouted = sorted(wanted - set(router.domains))
    fallback = None
    if unrouted:
        if router.fallback_domain is None:
            raise UserError(f"the reward config ({config_path or 'default'}) has no route for domain(s) {unrouted}; "
                             f"routed: {sorted(router.domains)}")
        fallback = router.fallback_domain
        routes[fallback] = router.domains[fallback]
    used = {name for route in routes.values() for name in route.sources}
    sources = {name: spec for name, spec in config.sources.items() if name in used}
    restricted = RewardConfig(replace(router, domains=routes, fallback_domain=fallback), sources)
    return HybridRewardRouter(restricted.router, build_sources(restricted))


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.evaluation.step_labels import StepLabelConfig, label_solutions, read_solutions
    from megatron_rlhf.config.errors import UserError
    from megatron_rlhf.preflight.label_steps import preflight_label_steps
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine

    try:
        config = StepLabelConfig(
            rollouts_per_step=args.rollouts_per_step, label_type=args.label_type, step_separator=args.step_separator,
            prompt_format=args.prompt_format, final_step=args.final_step, prefixes_per_batch=args.prefixes_per_batch,
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        )
    except ValueError as error:  # every value comes from the command line
        raise UserError(f"arguments: {error}") from None
    preflight_label_steps(args)  # policy, lengths, output: before anything is read or started
    dataset = read_solutions(args.input, config.step_separator, strict=not args.skip_malformed)
    if dataset.malformed:
        print(f"skipping {len(dataset.malformed)} malformed line(s):\n{dataset.report()}", file=sys.stderr)
    if not dataset.records:
        raise UserError(f"--input {args.input}: no valid solution")
    verifier = build_verifier(args.reward_config, {solution.domain for solution in dataset.records})
    try:
        rollout = RolloutConfig(model_dir=args.policy, tensor_parallel=args.tensor_parallel, dtype=args.dtype,
                                max_model_len=args.max_model_len, seed=args.seed, weight_transfer_backend=None)
        with RolloutEngine(rollout) as engine:
            stats = label_solutions(dataset.records, engine, verifier, config, args.output,
                                    show_progress=not args.no_progress)
    finally:
        verifier.close()
    print(f"labelled={stats.labelled} already_done={stats.already_done} skipped_too_long={stats.skipped_too_long} "
          f"unlabelled_infra_errors={stats.unlabelled_infra_errors} rollouts={stats.rollouts} "
          f"verifier_infra_errors={stats.infra_errors} malformed_lines={len(dataset.malformed)} -> {args.output}")
    if stats.skipped_ids:
        print(f"not labelled: {', '.join(stats.skipped_ids[:20])}" + (" ..." if len(stats.skipped_ids) > 20 else ""),
              file=sys.stderr)
    return 0 if not stats.skipped_ids else 1
