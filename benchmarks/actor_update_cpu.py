"""Actor (PPO policy) update throughput on CPU: Megatron ``ActorTrainer.update`` vs plain PyTorch.

For Llama-style models of a few sizes (fp32), in one process (Megatron TP1 PP1 DP1 on gloo),
measures in the same run, interleaved (M, P, M, P, ...) so that load from other processes on a
shared machine hits both alike:

- ``megatron``: :meth:`megatron_rlhf.training.actor_critic.ActorTrainer.update` with the
  package's defaults (Megatron DDP with fp32 grad buffers, distributed optimizer, Adam,
  global-norm clip 1.0), the PPO clipped surrogate with token-mean reduction, one minibatch
  split into microbatches: packed rows (no padding) within a token budget of
  ``micro_batch_size x seq_len``, the positions one of plain's padded microbatches computes, so
  neither side may hold more activations (``--no-packing``: right-padded microbatches of
  ``micro_batch_size`` sequences, as plain's);
- ``plain``: ``transformers.LlamaForCausalLM`` loaded from the same HF directory, the same loss
  written directly (``log_softmax`` -> gather -> clipped ratio -> masked token mean over the
  minibatch), the same microbatches (gradient accumulation), ``torch.nn.utils.clip_grad_norm_``
  and ``torch.optim.AdamW`` (weight decay 0).

Both see the same batch: ``batch`` prompt + response sequences right-padded to the longest one
(``seq_len`` tokens), variable prompt and response lengths, old log-probs = the initial model's
plus noise (so some ratios are clipped), random advantages. Throughput counts real (non-pad)
prompt + response tokens per second of one full update (forward, backward, clip, optimizer).
Sanity check: the first update of each side starts from identical weights, so their losses must
agree (reported as ``loss diff``).

Run: ``.venv/bin/python benchmarks/actor_update_cpu.py --out benchmarks/results/actor_update_cpu.md``
(add ``--profile`` for a torch.profiler table of one Megatron and one plain update). The script
writes the header and the table; the reading notes under them in the results file are written by
hand after looking at the numbers (a re-run overwrites them).
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

SIZES = {  # name -> (hidden, layers, intermediate); head_dim 64, 2 query heads per KV head
    "d256-L4": (256, 4, 768),
    "d512-L8": (512, 8, 1536),
}
VOCAB = 1024


@dataclass(frozen=True)
class BenchPlan:
    size: str
    """Key of SIZES."""
    batch: int = 8
    """Prompt + response sequences in the minibatch (one optimizer step per update)."""
    seq_len: int = 256
    """Longest prompt + response; the batch is right-padded to it."""
    micro_batch_size: int = 2
    """Sequences per microbatch (gradient accumulation over batch / micro_batch_size)."""
    repeats: int = 5
    """Timed updates per side (median reported), after one warm-up update each."""
    learning_rate: float = 1e-5
    packing: bool = True
    """Megatron's microbatches as packed rows (no padding) within a token budget of
    ``micro_batch_size x seq_len``: the positions one of plain's padded microbatches computes."""
    profile: bool = False
    rope_ab: bool = False
    """Also time Megatron's update with Megatron-Core's own packed RoPE (``models/packed_rope`` off),
    alternating with the other sides."""
    """Also print torch.profiler tables (top ops by self CPU time) of one update per side."""
    seed: int = 0


def make_batch(plan: BenchPlan):
    """The shared rollout batch: ``RolloutBatch`` with prompts of 16..64 and responses up to
    ``seq_len - 64`` tokens (one sequence is exactly ``seq_len`` long)."""
    import torch

    from megatron_rlhf.types import RolloutBatch

    generator = torch.Generator().manual_seed(plan.seed)
    max_prompt, max_response = 64, plan.seq_len - 64
    prompt_lengths = torch.randint(16, max_prompt + 1, (plan.batch,), generator=generator)
    response_lengths = torch.randint(
        max_response // 2, max_response + 1, (plan.batch,), generator=generator
    )
    prompt_lengths[0], response_lengths[0] = max_prompt, max_response
    prompt_ids = torch.randint(6, VOCAB, (plan.batch, max_prompt), generator=generator)
    response_ids = torch.randint(6, VOCAB, (plan.batch, max_response), generator=generator)
    response_mask = (
        torch.arange(max_response).unsqueeze(0) < response_lengths.unsqueeze(1)
    ).float()
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, 2))
    prompt_ids[torch.arange(max_prompt).unsqueeze(0) >= prompt_lengths.unsqueeze(1)] = 2
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_lengths=prompt_lengths,
        response_ids=response_ids,
        response_mask=response_mask,
        sampling_logprobs=torch.zeros(plan.batch, max_response),
        finish_reasons=["length"] * plan.batch,
        group_index=torch.arange(plan.batch),
        prompt_index=torch.arange(plan.batch),
        pad_token_id=2,
    )


def response_positions(batch):
    """``(input_ids [B, L], positions [B, R])``: the logit position predicting each response token."""
    import torch

    input_ids, response_start = batch.full_sequences()
    width = batch.response_ids.shape[1]
    positions = response_start.unsqueeze(1) - 1 + torch.arange(width).unsqueeze(0)
    return input_ids, positions.clamp(0, input_ids.shape[1] - 2)


def plain_response_logprobs(model, input_ids, positions):
    """``[b, R]`` log pi(response token) from a transformers causal LM (fp32 log_softmax)."""
    import torch

    logits = model(input_ids=input_ids).logits[:, :-1].float()
    token_logprobs = (
        torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    )
    return token_logprobs.gather(1, positions)


def plain_update(model, optimizer, batch, experience, plan: BenchPlan, clip: float = 0.2) -> float:
    """One PPO minibatch step: accumulate the token-mean clipped surrogate over microbatches."""
    import torch

    input_ids, positions = response_positions(batch)
    mask = experience.response_mask
    total_tokens = mask.sum().clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    model.train()
    loss_value = 0.0
    for rows in torch.arange(plan.batch).split(plan.micro_batch_size):
        logprobs = plain_response_logprobs(model, input_ids[rows], positions[rows])
        ratio = torch.exp(logprobs - experience.old_logprobs[rows])
        advantages = experience.advantages[rows]
        surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
        loss = -(surrogate * mask[rows]).sum() / total_tokens
        loss.backward()
        loss_value += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss_value


def make_experience(plan: BenchPlan, batch, hf_model):
    import torch

    from megatron_rlhf.algorithms import Experience

    generator = torch.Generator().manual_seed(plan.seed + 1)
    input_ids, positions = response_positions(batch)
    with torch.no_grad():
        initial = plain_response_logprobs(hf_model.eval(), input_ids, positions)
    mask = batch.response_mask
    shape = tuple(mask.shape)
    zeros = torch.zeros(plan.batch)
    return Experience(
        response_mask=mask.bool(),
        old_logprobs=(initial + 0.2 * torch.randn(shape, generator=generator)) * mask,
        advantages=torch.randn(shape, generator=generator) * mask,
        token_rewards=torch.zeros(shape),
        sequence_scores=zeros,
        raw_rewards=zeros,
    )


def _profile(label: str, update) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        update()
    print(f"--- profile: {label} (top ops by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)


def _worker(plan: BenchPlan, result_path: str) -> None:
    import torch

    with tempfile.TemporaryDirectory(prefix=f"actor_bench_{plan.size}_") as work:  # removed once both models load
        model, actor, hf_model = build_sides(plan, Path(work))
    optimizer = torch.optim.AdamW(
        hf_model.parameters(), lr=plan.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    batch = make_batch(plan)
    experience = make_experience(plan, batch, hf_model)
    tokens = int(batch.prompt_lengths.sum() + batch.response_mask.sum())
    _measure(plan, result_path, model, actor, hf_model, optimizer, batch, experience, tokens)


def build_sides(plan: BenchPlan, work: Path):
    """Megatron's model and actor, and plain transformers' model, from one tiny HF checkpoint of
    ``plan.size`` written in ``work`` (in a process that becomes a one-rank Megatron world)."""
    import torch
    import transformers

    from megatron_rlhf.algorithms import AlgorithmConfig
    from megatron_rlhf.checkpoint.hf_io import HFWeightReader
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.mapping.engine import load_hf_weights
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, build_stage_model, validate_layout
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.training.actor_critic import ActorTrainer, PPOUpdateConfig
    from megatron_rlhf.training.megatron_step import OptimizerSettings

    hidden, layers, intermediate = SIZES[plan.size]
    hf_dir = make_tiny_hf_model(
        "llama",
        work / "hf",
        seed=0,
        vocab_size=VOCAB,
        tokenizer=train_tiny_tokenizer(VOCAB, seed=0),
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        head_dim=64,
        max_position_embeddings=max(plan.seq_len, 256),
    )
    parallel, build = ParallelConfig(), ModelBuildConfig()
    initialize_parallel(parallel, seed=plan.seed)
    arch = arch_spec_from_hf_dir(hf_dir)
    model = build_stage_model(arch, parallel, build)
    load_hf_weights(
        model, HFWeightReader(hf_dir), arch, "lm", validate_layout(arch, parallel, build)
    )
    actor = ActorTrainer(
        model,
        OptimizerSettings(lr=plan.learning_rate, clip_grad=1.0),
        AlgorithmConfig(kl_mode="none"),
        PPOUpdateConfig(micro_batch_size=plan.micro_batch_size, packing=plan.packing,
                        max_tokens_per_microbatch=plan.micro_batch_size * plan.seq_len if plan.packing else 0),
        valid_vocab_size=VOCAB,
    )
    return model, actor, transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


def _measure(plan: BenchPlan, result_path: str, model, actor, hf_model, optimizer, batch, experience,
             tokens: int) -> None:
    """Warm-up, interleaved timed updates of each side, optional profiles; the JSON result."""
    import torch

    from megatron_rlhf.models import packed_rope

    def megatron_update() -> float:
        return actor.update(batch, experience)[0].loss

    def plain() -> float:
        return plain_update(hf_model, optimizer, batch, experience, plan)

    def megatron_rope_update() -> float:  # Megatron-Core's own packed RoPE, for the A/B
        from megatron.core.models.common.embeddings import rope_utils
        from megatron.core.transformer import attention

        attention.apply_rotary_pos_emb = rope_utils.apply_rotary_pos_emb
        try:
            return megatron_update()
        finally:
            packed_rope.install()

    first_losses = (megatron_update(), plain())  # warm-up; identical starting weights
    sides = [("megatron", megatron_update), ("plain", plain)]
    if plan.rope_ab:
        megatron_rope_update()
        sides.insert(1, ("megatron_rope", megatron_rope_update))
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    for _ in range(plan.repeats):
        for name, update in sides:
            start = time.perf_counter()
            update()
            times[name].append(time.perf_counter() - start)
    if plan.profile:
        _profile(f"megatron {plan.size}", megatron_update)
        _profile(f"plain {plan.size}", plain)
    Path(result_path).write_text(
        json.dumps(
            {
                "size": plan.size,
                "params": sum(p.numel() for p in model.parameters()),
                "tokens": tokens,
                "threads": torch.get_num_threads(),
                "loss_diff": abs(first_losses[0] - first_losses[1]),
                "megatron_s": times["megatron"],
                "plain_s": times["plain"],
                "megatron_rope_s": times.get("megatron_rope", []),
                "plan": asdict(plan),
            }
        )
    )


def _row(result: dict) -> str:
    megatron_s, plain_s = (
        statistics.median(result["megatron_s"]),
        statistics.median(result["plain_s"]),
    )
    megatron_tps, plain_tps = result["tokens"] / megatron_s, result["tokens"] / plain_s
    spread = [
        min(result["megatron_s"]),
        max(result["megatron_s"]),
        min(result["plain_s"]),
        max(result["plain_s"]),
    ]
    paired = statistics.median(p / m for m, p in zip(result["megatron_s"], result["plain_s"]))
    return (
        f"| {result['size']} | {result['params'] / 1e6:.1f}M | {result['tokens']} | {megatron_s:.2f} | "
        f"{plain_s:.2f} | {megatron_tps:.0f} | {plain_tps:.0f} | {megatron_tps / plain_tps:.2f}x | {paired:.2f}x | "
        f"{spread[0]:.2f}-{spread[1]:.2f} / {spread[2]:.2f}-{spread[3]:.2f} | {result['loss_diff']:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-packing", action="store_true",
                        help="Megatron with right-padded microbatches too (default: packed rows within the "
                             "positions of one padded microbatch, micro-batch-size x seq-len tokens)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rope-ab", action="store_true",
                        help="also time Megatron's update with Megatron-Core's own packed RoPE (ours off)")
    parser.add_argument("--out", default=None, help="write a Markdown table here")
    args = parser.parse_args()

    from megatron_rlhf.parallel.launch import spawn

    rows = []
    load_before = os.getloadavg()
    for size in args.sizes:
        plan = BenchPlan(
            size=size,
            batch=args.batch,
            seq_len=args.seq_len,
            micro_batch_size=args.micro_batch_size,
            repeats=args.repeats,
            packing=not args.no_packing,
            profile=args.profile,
            rope_ab=args.rope_ab,
        )
        with tempfile.TemporaryDirectory(prefix="actor_bench_result_") as scratch:
            result_path = os.path.join(scratch, "result.json")
            spawn(_worker, 1, plan, result_path)
            rows.append(json.loads(Path(result_path).read_text()))
        print(rows[-1], flush=True)
    lines = [
        ("| model | params | tokens/update | megatron s | plain s | megatron tok/s | plain tok/s | "
        "megatron/plain | paired | min-max s (M / P) | loss diff |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(result) for result in rows),
    ]
    if args.rope_ab:
        lines += ["", "Megatron's update with this stack's packed RoPE (`models/packed_rope.py`) against Megatron-Core's "
                  "own, alternating in the same process:", "",
                  "| model | ours s | Megatron-Core RoPE s | paired (core / ours) |", "|---|---|---|---|"]
        for result in rows:
            ours, core = result["megatron_s"], result["megatron_rope_s"]
            paired = statistics.median(c / o for o, c in zip(ours, core))
            lines.append(f"| {result['size']} | {statistics.median(ours):.3f} | {statistics.median(core):.3f} | "
                         f"{paired:.3f}x |")
    load_after = os.getloadavg()
    table = "\n".join(lines)
    load = (
        f"Load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in load_before)}; "
        f"after: {' / '.join(f'{x:.1f}' for x in load_after)}."
    )
    print(table)
    print(load)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        command = "  .venv/bin/python benchmarks/actor_update_cpu.py " + " ".join(sys.argv[1:])
        command += "\n\nMegatron's microbatches: " + ("right-padded, as plain's" if args.no_packing else
                   "packed rows within micro-batch-size x seq-len tokens (plain: right-padded)")
        Path(args.out).write_text(
            f"# Actor update on CPU ({os.cpu_count()} cores)\n\nCommand:\n\n{command}\n\n{table}\n\n{load}\n"
        )


if __name__ == "__main__":
    main()
