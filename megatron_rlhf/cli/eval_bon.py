"""`megatron-rlhf eval-bon`: Best-of-N curves of reward models (the pipeline:
:mod:`megatron_rlhf.evaluation.best_of_n`).

Stages, each engine released before the next starts: the policy samples ``N_max`` responses per
prompt and the verifier grades them; then every ``--scorer`` scores the same responses:

- ``random``: uniform random scores (seeded);
- ``verifier``: the grading verifier's own reward (an oracle-like scorer: reaches pass@N);
- ``rm:CKPT[:AGG,...]``: a reward model trained by ``train-rm`` (ORM or PRM), loaded in its own
  process(es) at tensor parallel ``--rm-tensor-parallel``; a PRM gives one curve per aggregate
  (``outcome``, ``last``, ``min``, ``product``, ``mean``; default ``outcome``);
- ``genrm:HF_DIR[:ref|noref]``: a generative judge (with the reference answer, the default, or
  without).

Writes ``best_of_n.md``, ``best_of_n.png`` and ``best_of_n.json`` under ``--out``. Exit codes: 0
done; 2 a user error (missing file, bad scorer spec, a scorer directory that is not what its kind
claims, lengths beyond the model's limit), found by ``preflight.eval_bon`` before vLLM starts.
Building the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCORER_KINDS = ("random", "verifier", "rm", "genrm")
AGGREGATES = ("outcome", "last", "min", "product", "mean")


@dataclass(frozen=True)
class ScorerSpec:
    kind: str
    """random | verifier | rm | genrm."""
    path: str | None = None
    """rm: the reward-model checkpoint; genrm: the judge's HF directory."""
    aggregates: tuple[str, ...] = ("outcome",)
    """rm: one curve per aggregate of a PRM's step rewards."""
    with_reference: bool = True
    """genrm: judge with the reference answer."""

    def names(self) -> list[str]:
        """Curve names of this scorer, as they appear in the report."""
        if self.kind == "rm":
            stem = Path(self.path or "").name or "rm"
            return [f"rm:{stem}" if aggregate == "outcome" else f"rm:{stem}:{aggregate}" for aggregate in self.aggregates]
        if self.kind == "genrm":
            return [f"genrm:{Path(self.path or '').name}:{'ref' if self.with_reference else 'noref'}"]
        return [self.kind]


def parse_scorer_spec(text: str) -> ScorerSpec:
    """A ``--scorer`` value (see the module docstring); ValueError naming the value otherwise."""
    kind, _, rest = text.partition(":")
    if kind not in SCORER_KINDS:
        raise ValueError(f"--scorer {text!r}: unknown kind {kind!r} (choose {', '.join(SCORER_KINDS)})")
    if kind in ("random", "verifier"):
        if rest:
            raise ValueError(f"--scorer {text!r}: {kind} takes no arguments")
        return ScorerSpec(kind)
    path, _, option = rest.partition(":")
    if not path:
        raise ValueError(f"--scorer {text!r}: {kind} needs a path ({kind}:DIR)")
    if kind == "rm":
        aggregates = tuple(option.split(",")) if option else ("outcome",)
        unknown = [aggregate for aggregate in aggregates if aggregate not in AGGREGATES]
        if unknown:
            raise ValueError(f"--scorer {text!r}: unknown aggregate(s) {unknown} (choose {', '.join(AGGREGATES)})")
        return ScorerSpec(kind, path, aggregates=aggregates)
    if option not in ("", "ref", "noref"):
        raise ValueError(f"--scorer {text!r}: genrm option must be 'ref' or 'noref', got {option!r}")
    return ScorerSpec(kind, path, with_reference=option != "noref")


def _scorer_spec(text: str) -> ScorerSpec:
    try:
        return parse_scorer_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, metavar="DIR", help="HF model directory of the policy")
    parser.add_argument("--prompts", required=True, metavar="IN.jsonl",
                        help='prompts: {"id"?, "prompt" | "messages", "domain", "ground_truth"} per line')
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write best_of_n.{md,png,json}")
    parser.add_argument("--scorer", type=_scorer_spec, action="append", required=True, metavar="SPEC",
                        help="random | verifier | rm:CKPT[:AGG,...] | genrm:HF_DIR[:ref|noref] (repeatable)")
    parser.add_argument("--n-max", type=int, default=16, help="responses per prompt (default 16)")
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--plain-prompts", action="store_true", help="feed prompt text raw, without the chat template")
    parser.add_argument("--prompts-per-call", type=int, default=64)
    parser.add_argument("--tensor-parallel", type=int, default=1, help="vLLM tensor parallel size (policy and GenRM)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0, help="engine seed (and the random scorer's)")
    parser.add_argument("--reward-config", default=None, metavar="REWARDS.yaml",
                        help="verifiers by domain, for grading (default: one verifier per verifiable domain)")
    parser.add_argument("--rm-tensor-parallel", type=int, default=1, help="tensor parallel size of rm: scorers")
    parser.add_argument("--genrm-max-new-tokens", type=int, default=256)


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.data.prompts import PromptDatasetConfig, load_prompt_dataset
    from megatron_rlhf.cli.label_steps import build_verifier
    from megatron_rlhf.evaluation.best_of_n import (
        BestOfNConfig,
        evaluate_best_of_n,
        sample_and_grade,
        write_report,
    )
    from megatron_rlhf.config.errors import UserError
    from megatron_rlhf.preflight.eval_bon import preflight_eval_bon
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine

    try:
        config = BestOfNConfig(n_max=args.n_max, temperature=args.temperature, top_p=args.top_p,
                               max_new_tokens=args.max_new_tokens, chat_template=not args.plain_prompts,
                               prompts_per_call=args.prompts_per_call)
    except ValueError as error:  # every value comes from the command line
        raise UserError(f"arguments: {error}") from None
    preflight_eval_bon(args)
    prompts, load_stats = load_prompt_dataset(args.prompts, PromptDatasetConfig())
    print(load_stats.summary())
    verifier = build_verifier(args.reward_config, {record.domain for record in prompts})
    try:
        policy = RolloutConfig(model_dir=args.policy, tensor_parallel=args.tensor_parallel, dtype=args.dtype,
                               max_model_len=args.max_model_len, seed=args.seed, weight_transfer_backend=None)
        with RolloutEngine(policy) as engine:
            responses = sample_and_grade(engine, prompts, verifier, config)
        scorers: dict[str, Any] = {}
        for spec in args.scorer:
            scorers.update(_build_scorers(spec, responses, verifier, args))
        report = evaluate_best_of_n(responses, scorers)
    finally:
        verifier.close()
    paths = write_report(report, args.out)
    print(Path(paths["md"]).read_text())
    print(f"wrote {', '.join(str(path) for path in paths.values())}")
    return 0


def _build_scorers(spec: ScorerSpec, responses: Any, verifier: Any, args: argparse.Namespace) -> dict[str, Any]:
    """name -> scorer for one spec; model-backed scores are computed here, engine by engine."""
    from megatron_rlhf.evaluation.best_of_n import aggregate_result, precomputed_scorer, random_scorer, source_scorer

    if spec.kind == "random":
        return {"random": random_scorer(args.seed)}
    if spec.kind == "verifier":
        return {"verifier": source_scorer(verifier)}
    flat = [sample for group in responses.samples for sample in group]
    if spec.kind == "rm":
        from megatron_rlhf.parallel.launch import spawn
        from megatron_rlhf.rewards.reward_model_source import RewardModelSourceConfig, score_in_this_rank

        rm = RewardModelSourceConfig(ckpt_dir=spec.path, tensor_parallel=args.rm_tensor_parallel)
        results = spawn(score_in_this_rank, args.rm_tensor_parallel, rm, flat)[0]
    else:
        from megatron_rlhf.rewards.genrm import GenRMConfig, GenRMSource
        from megatron_rlhf.config.rollout import RolloutConfig

        judge = RolloutConfig(model_dir=spec.path, tensor_parallel=args.tensor_parallel, dtype=args.dtype,
                              max_model_len=args.max_model_len, seed=args.seed, weight_transfer_backend=None)
        source = GenRMSource(GenRMConfig(rollout=judge, reference="required" if spec.with_reference else "never",
                                         max_new_tokens=args.genrm_max_new_tokens))
        try:
            results = source.score(flat)
        finally:
            source.close()
    scorers = {}
    for name, aggregate in zip(spec.names(), spec.aggregates if spec.kind == "rm" else ("outcome",)):
        values = {sample.sample_id: aggregate_result(result, aggregate) for sample, result in zip(flat, results, strict=True)}
        scorers[name] = precomputed_scorer(values)
        unscorable = sum(math.isnan(value) for value in values.values())
        if unscorable:
            print(f"{name}: {unscorable} of {len(values)} responses could not be scored (they never win a selection)")
    return scorers
