"""`megatron-rlhf plan`: does a layout fit the GPUs? Answered before any job starts.

Two inputs: a Hugging Face ``config.json`` plus layout flags, or a recipe (``--recipe``, the
YAML that ``train-rl`` / ``train-rm`` / ``train-sft`` read; its layout, batch and engine settings
are used and the flags given here override the GPU and the sizes it does not set).

Output: a table of GiB per GPU, per pipeline stage and phase, then the verdict, then the last line
``params_per_gpu=<int> weights_grads_optimizer_gib=<float> peak_gib=<float> fits=<yes|no>``.
Exit codes: 0 fits; 1 does not fit (the phase and component that overflow are named); 2 invalid
layout or other user error (printed as ``error: ...`` by the CLI).
Imports only the standard library and the pure planning modules (no torch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_rlhf.config.errors import ConfigError, MissingInput
from megatron_rlhf.cli.args import non_negative_float, positive_float, positive_int
from megatron_rlhf.planning.inputs import plan_inputs_from_flags

EXIT_FITS = 0
EXIT_DOES_NOT_FIT = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--hf-config", metavar="CONFIG.json",
        help="HF config.json (or its directory); with --recipe: the architecture to use when the "
        "recipe's model directory has no config.json")
    add("--recipe", metavar="YAML", help="a recipe from examples/ (train-rl or train-rm format)")
    for flag, text in (("--tp", "tensor parallel"), ("--pp", "pipeline parallel"),
                       ("--ep", "expert parallel"), ("--cp", "context parallel"),
                       ("--dp", "data parallel (model replicas)")):
        add(flag, type=positive_int, default=None, metavar="N", help=f"{text} (default 1)")
    add("--etp", type=positive_int, default=None, metavar="N", help="expert tensor parallel (default: TP)")
    add("--first-stage-layers", type=positive_int, default=None, metavar="N", help="uneven PP: layers on stage 0")
    add("--last-stage-layers", type=positive_int, default=None, metavar="N", help="uneven PP: layers on the last stage")
    add("--gpu", choices=("h100", "h200"), default=None, help="GPU model (default h100)")
    add("--gpu-memory-gib", type=positive_float, default=None, metavar="G", help="GPU memory instead of --gpu")
    add("--reserve-gib", type=non_negative_float, default=None, metavar="G",
        help="held back for CUDA context, NCCL, fragmentation (default 5)")
    add("--seq-len", type=positive_int, default=None, metavar="N", help="tokens per sequence (default 4096)")
    add("--micro-batch", type=positive_int, default=None, metavar="N", help="sequences per microbatch (default 1)")
    add("--microbatches", type=positive_int, default=None, metavar="N",
        help="microbatches per step per DP rank (default: PP)")
    add("--recompute", choices=("none", "selective", "full"), default=None, help="activation recompute")
    add("--sequence-parallel", action="store_true", default=None, help="Megatron sequence parallelism")
    add("--params-dtype", choices=("bf16", "fp32", "fp16"), default=None, help="weights (default bf16)")
    add("--grad-dtype", choices=("fp32", "bf16"), default=None, help="gradient buffer (default fp32)")
    add("--optimizer", choices=("adam", "sgd"), default=None, help="default adam")
    add("--no-distributed-optimizer", action="store_true", help="replicate optimizer state on every DP rank")
    add("--transformer-impl", choices=("transformer_engine", "local"), default=None,
        help="layer spec: local keeps norm weights in fp32 (default transformer_engine)")
    add("--role", choices=("lm", "value", "reward", "prm"), default=None, help="head of the trained model")
    add("--critic", action="store_true", default=None, help="a PPO critic is colocated (same layout)")
    add("--reference", action="store_true", default=None, help="a frozen reference model is colocated")
    add("--engine-tp", type=positive_int, default=None, metavar="N",
        help="vLLM engine with this TP (default: no engine)")
    add("--disaggregated", action="store_true", default=None,
        help="the engine has GPUs of its own (planned as the engine row) instead of sharing the trainer's")
    add("--engine-memory-fraction", type=positive_float, default=None, metavar="F",
        help="share of an engine GPU vLLM may take (gpu_memory_utilization; default 0.9 disaggregated)")
    add("--rollout-sequences", type=positive_int, default=None, metavar="N", help="sequences per engine at once (default 64)")
    add("--rollout-tokens", type=positive_int, default=None, metavar="N", help="prompt + response tokens (default: --seq-len)")
    add("--fp8-rollout", action="store_true", help="engine weights in fp8")
    add("--kv-fp8", action="store_true", help="KV cache in fp8")
    add("--sync-bucket-mib", type=positive_int, default=None, metavar="M", help="weight-sync bucket (default 64)")
    add("--offload", choices=("none", "optimizer", "all"), default=None, help="to host outside training")
    add("--gpus-per-node", type=positive_int, default=None, metavar="N", help="default 8")


def _hf_config(path_text: str) -> tuple[dict, str]:
    path = Path(path_text)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MissingInput(f"--hf-config: {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config, str(path)


def recipe_group_settings(path: str, hf_config: str | None = None) -> list[tuple[str, dict, str, dict]]:
    """Load a ``train-rl`` or ``train-rm`` recipe (bases merged), type it strictly, and return
    each GPU group's (name, HF config, source, planner settings)."""
    from megatron_rlhf.config.recipe import load_recipe
    from megatron_rlhf.planning.fit_check import rl_group_settings, rm_plan_settings

    mapping = load_recipe(path)
    if "role" in mapping and "model" in mapping:  # a train-rm recipe
        from megatron_rlhf.trainer.reward_model_run import load_train_rm_config

        config = load_train_rm_config(path)
        return [(config.role, *rm_plan_settings(config, hf_config_path=hf_config))]
    from megatron_rlhf.cli.train_rl import rl_config_from_mapping

    config = rl_config_from_mapping(mapping, path)
    if hf_config is not None:
        import dataclasses

        config = dataclasses.replace(config, fit_check=dataclasses.replace(config.fit_check, hf_config=hf_config))
    return rl_group_settings(config)


def run(args: argparse.Namespace) -> int:
    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.planning.plan import compute_plan
    from megatron_rlhf.planning.report import render, summary_of

    if args.recipe:
        groups = recipe_group_settings(args.recipe, args.hf_config)
    elif args.hf_config is None:
        raise ValueError("plan: give --hf-config CONFIG.json (with layout flags) or --recipe YAML")
    else:
        config, source = _hf_config(args.hf_config)
        groups = [("", config, source, None)]
    plans = []
    for name, config, source, base in groups:
        arch = arch_spec_from_hf_config(config, source)
        layout, request, gpu = plan_inputs_from_flags(args, base)
        plans.append(compute_plan(arch, layout, request, gpu))
        title = f"{source}" + (f" ({name} group)" if name else "")
        print(render(plans[-1], title=title, summary=len(groups) == 1), flush=True)
    if len(plans) > 1:
        print(summary_of(plans), flush=True)
    return EXIT_FITS if all(plan.fits for plan in plans) else EXIT_DOES_NOT_FIT
