"""Padded vs packed actor update on CPU: the time sequence packing saves on EOS-varying lengths.

One process (Megatron TP1 PP1 DP1 on gloo), one tiny Llama, two
:class:`~megatron_rlhf.training.actor_critic.ActorTrainer` s built from the same HF directory:

- ``padded``: today's path, ``micro_batch_size`` full sequences per microbatch, right padded to
  the longest sequence of the batch;
- ``packed``: ``packing: true`` with ``max_tokens_per_microbatch`` (default: the padded path's
  ``micro_batch_size * longest`` positions, so both compute at most as many positions per
  microbatch): each microbatch one THD row, no padding.

The batch mimics EOS-terminated sampling: prompts of 16..64 tokens and response lengths drawn
geometrically (most responses stop early, one runs to the cap), so the padded path computes many
padding positions. Both updates start from the same weights, so their first losses must agree
(``loss diff``, expected ~1e-7 in fp32). Timed interleaved (padded, packed, padded, ...), median
of ``--repeats`` after one warm-up each; the table also gives each path's padding fraction.

Run: ``.venv/bin/python benchmarks/packing_cpu.py --out benchmarks/results/packing_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 1024


@dataclass(frozen=True)
class BenchPlan:
    hidden: int = 256
    layers: int = 4
    batch: int = 16
    max_response: int = 192
    micro_batch_size: int = 4
    max_tokens_per_microbatch: int = 0
    """0: micro_batch_size x the longest sequence."""
    repeats: int = 3
    seed: int = 0


def make_batch(plan: BenchPlan):
    """A ``RolloutBatch`` with EOS-like response lengths (geometric, mean ~max_response / 4)."""
    import torch

    from megatron_rlhf.types import RolloutBatch

    generator = torch.Generator().manual_seed(plan.seed)
    max_prompt = 64
    prompt_lengths = torch.randint(16, max_prompt + 1, (plan.batch,), generator=generator)
    uniform = torch.rand(plan.batch, generator=generator)
    mean = plan.max_response / 4
    response_lengths = (torch.log1p(-uniform) * -mean).long().clamp(1, plan.max_response)
    response_lengths[0] = plan.max_response
    prompt_ids = torch.randint(6, VOCAB, (plan.batch, max_prompt), generator=generator)
    response_ids = torch.randint(6, VOCAB, (plan.batch, plan.max_response), generator=generator)
    mask = (torch.arange(plan.max_response).unsqueeze(0) < response_lengths.unsqueeze(1)).float()
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, 2))
    prompt_ids[torch.arange(max_prompt).unsqueeze(0) >= prompt_lengths.unsqueeze(1)] = 2
    return RolloutBatch(prompt_ids=prompt_ids, prompt_lengths=prompt_lengths, response_ids=response_ids,
                        response_mask=mask, sampling_logprobs=torch.zeros(plan.batch, plan.max_response),
                        finish_reasons=["stop"] * plan.batch, group_index=torch.arange(plan.batch),
                        prompt_index=torch.arange(plan.batch), pad_token_id=2)


def _worker(plan: BenchPlan, result_path: str) -> None:
    import torch

    from megatron_rlhf.algorithms import AlgorithmConfig, Experience
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.training.actor_critic import ActorTrainer, PPOUpdateConfig
    from megatron_rlhf.training.megatron_step import OptimizerSettings

    batch = make_batch(plan)
    longest = int((batch.prompt_lengths + batch.response_lengths).max())
    budget = plan.max_tokens_per_microbatch or plan.micro_batch_size * longest
    hf_dir = make_tiny_hf_model("llama", Path(tempfile.mkdtemp(prefix="packing_bench_")) / "hf", seed=0,
                                vocab_size=VOCAB, tokenizer=train_tiny_tokenizer(VOCAB, seed=0),
                                hidden_size=plan.hidden, num_hidden_layers=plan.layers,
                                intermediate_size=3 * plan.hidden, num_attention_heads=plan.hidden // 64,
                                num_key_value_heads=plan.hidden // 128, head_dim=64, max_position_embeddings=512)
    parallel, build = ParallelConfig(), ModelBuildConfig()
    initialize_parallel(parallel, seed=plan.seed)
    arch = arch_spec_from_hf_dir(hf_dir)
    updates = {"padded": PPOUpdateConfig(micro_batch_size=plan.micro_batch_size),
               "packed": PPOUpdateConfig(packing=True, max_tokens_per_microbatch=budget)}
    trainers = {}
    for name, update in updates.items():
        model = build_stage_model(arch, parallel, build)
        load_hf_weights(model, HFWeightReader(hf_dir), arch, "lm", validate_layout(arch, parallel, build))
        trainers[name] = ActorTrainer(model, OptimizerSettings(lr=1e-5, clip_grad=1.0), AlgorithmConfig(kl_mode="none"),
                                      update, valid_vocab_size=VOCAB)
    old_logprobs = trainers["padded"].logprobs(batch)
    mask = batch.response_mask
    experience = Experience(response_mask=mask.bool(), old_logprobs=old_logprobs,
                            advantages=torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask,
                            token_rewards=torch.zeros(mask.shape), sequence_scores=torch.zeros(plan.batch),
                            raw_rewards=torch.zeros(plan.batch))
    first = {name: trainer.update(batch, experience)[0] for name, trainer in trainers.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(plan.repeats):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.update(batch, experience)
            times[name].append(time.perf_counter() - start)
    Path(result_path).write_text(json.dumps({
        "plan": asdict(plan), "budget": budget, "threads": torch.get_num_threads(),
        "real_tokens": int((batch.prompt_lengths + batch.response_lengths).sum()),
        "padding_fraction": {name: step.terms["padding_fraction"] for name, step in first.items()},
        "loss_diff": abs(first["padded"].loss - first["packed"].loss),
        "grad_norm_diff": abs(first["padded"].grad_norm - first["packed"].grad_norm),
        "seconds": times,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-response", type=int, default=192)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-tokens-per-microbatch", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="", help="e.g. 'smoke' (written into the results title)")
    parser.add_argument("--out", default=None, help="write a Markdown table here")
    args = parser.parse_args()

    from megatron_rlhf.parallel.launch import spawn

    plan = BenchPlan(args.hidden, args.layers, args.batch, args.max_response, args.micro_batch_size,
                     args.max_tokens_per_microbatch, args.repeats)
    load_before = os.getloadavg()
    result_path = tempfile.mktemp(suffix=".json")
    spawn(_worker, 1, plan, result_path)
    result = json.loads(Path(result_path).read_text())
    padded, packed = (statistics.median(result["seconds"][name]) for name in ("padded", "packed"))
    paired = statistics.median(a / b for a, b in zip(result["seconds"]["padded"], result["seconds"]["packed"]))
    table = "\n".join([
        "| path | padding fraction | median s / update | min-max s |",
        "|---|---|---|---|",
        *(f"| {name} | {result['padding_fraction'][name]:.3f} | {seconds:.2f} | "
          f"{min(result['seconds'][name]):.2f}-{max(result['seconds'][name]):.2f} |"
          for name, seconds in (("padded", padded), ("packed", packed))),
    ])
    summary = (f"padded / packed time: {padded / packed:.2f}x (paired median {paired:.2f}x); real tokens "
               f"{result['real_tokens']}, token budget {result['budget']}, threads {result['threads']}; first-update "
               f"loss diff {result['loss_diff']:.1e}, grad-norm diff {result['grad_norm_diff']:.1e}.")
    load_after = os.getloadavg()
    load = (f"Load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in load_before)}; "
            f"after: {' / '.join(f'{x:.1f}' for x in load_after)}.")
    print(table, summary, load, sep="\n")
    if args.out:
        title = f"# Padded vs packed actor update on CPU ({os.cpu_count()} cores){' - ' + args.label if args.label else ''}"
        command = "  .venv/bin/python benchmarks/packing_cpu.py " + " ".join(sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"{title}\n\nCommand:\n\n{command}\n\n{table}\n\n{summary}\n\n{load}\n")


if __name__ == "__main__":
    main()
