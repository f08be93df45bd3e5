"""End-to-end check of weight sync: Megatron (any layout) -> vLLM, then compare log-probs.

:func:`check_weight_sync` (the ``megatron-rlhf check-weight-sync`` command) loads an HF model
into Megatron at TP x PP (x EP), starts a vLLM engine from the same HF directory, perturbs the
Megatron weights with one optimizer step, syncs them into vLLM, samples responses and scores the
same responses with Megatron. It then takes a second optimizer step and shows that vLLM is stale
until the next sync (so the check cannot pass vacuously), syncs again and re-checks.

Reported: ``max_abs_logprob_diff`` (over every sampled response token, after each sync),
``mean_importance_ratio`` (mean of ``exp(logp_megatron - logp_vllm)``), ``sync_seconds`` (first
sync), and the stale difference before the second sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.parallel.launch import Launcher

DEFAULT_TOLERANCE = 1e-3


class WeightSyncCheckFailed(RuntimeError):
    def __init__(self, result: "SyncCheckResult", tolerance: float):
        super().__init__(
            f"max_abs_logprob_diff={result.max_abs_logprob_diff:.3e} exceeds {tolerance:.1e}"
            if result.max_abs_logprob_diff > tolerance
            else "the second optimizer step did not change vLLM's outputs (check is vacuous)"
        )
        self.result = result


@dataclass(frozen=True)
class SyncCheckResult:
    max_abs_logprob_diff: float
    """Largest |logp_megatron - logp_vllm| over both checks (after sync 1 and sync 2)."""
    mean_importance_ratio: float
    sync_seconds: float
    stale_logprob_diff: float
    """Same comparison after the second step but before the second sync (must be large)."""
    changed_after_second_sync: bool
    tokens_compared: int
    sync_bytes: int


@dataclass(frozen=True)
class SyncCheckPlan:
    hf_dir: str
    parallel: ParallelConfig
    engine_tensor_parallel: int = 1
    num_prompts: int = 4
    samples_per_prompt: int = 2
    max_new_tokens: int = 12
    learning_rate: float = 1e-2
    bucket_bytes: int = 1024**2
    seed: int = 0
    weight_transfer_backend: str = "gloo"
    """Transport under test (``RolloutConfig.weight_transfer_backend``); the user command passes auto."""


def _compare(megatron_lp: torch.Tensor, batch) -> tuple[float, float, int]:
    mask = batch.response_mask.bool()
    diff = (megatron_lp - batch.sampling_logprobs)[mask]
    ratio = torch.exp(diff)
    return float(diff.abs().max()), float(ratio.mean()), int(mask.sum())


def _check_layout(plan: SyncCheckPlan, parallel: ParallelConfig, engine, sync) -> SyncCheckResult | None:
    """One layout: build, step, sync, compare; step again, check staleness, sync, compare."""
    from megatron_rlhf.checkpoint.role_model import HFWeights, load_role_model
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig
    from megatron_rlhf.models.sequence_logprobs import response_logprobs
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.config.sampling import SamplingSettings
    from megatron_rlhf.training.lm_loss import next_token_loss
    from megatron_rlhf.config.optimizer import OptimizerSettings
    from megatron_rlhf.training.megatron_step import MegatronUpdater

    state = initialize_parallel(parallel, seed=plan.seed)
    arch = arch_spec_from_hf_dir(plan.hf_dir)
    model = load_role_model(arch, parallel, ModelBuildConfig(role="lm"), HFWeights(plan.hf_dir)).model
    generator = torch.Generator().manual_seed(plan.seed)
    low = 6  # skip the tiny tokenizers' special ids
    prompts = torch.randint(low, arch.vocab_size, (plan.num_prompts, 8), generator=generator)
    updater = MegatronUpdater(model, OptimizerSettings(lr=plan.learning_rate, clip_grad=1.0))

    def step() -> None:
        local = prompts.chunk(state.data_parallel_size)[state.data_parallel_rank]
        updater.step([{"input_ids": local.to(state.device)}],
                     lambda out, mb: next_token_loss(out, mb, arch.vocab_size))

    settings = SamplingSettings(n=plan.samples_per_prompt, max_new_tokens=plan.max_new_tokens, seed=plan.seed)

    def sample():
        batch = [engine.generate(prompts.tolist(), settings)] if engine is not None else [None]
        torch.distributed.broadcast_object_list(batch, src=0)
        return batch[0]

    step()
    report = sync.sync(model, arch)
    first = sample()
    diff_1, ratio_1, tokens_1 = _compare(response_logprobs(model, first, arch.vocab_size), first)
    step()
    stale, _, _ = _compare(response_logprobs(model, first, arch.vocab_size), first)
    sync.sync(model, arch)
    second = sample()
    diff_2, ratio_2, tokens_2 = _compare(response_logprobs(model, second, arch.vocab_size), second)
    if state.rank != 0:
        return None
    return SyncCheckResult(
        max_abs_logprob_diff=max(diff_1, diff_2),
        mean_importance_ratio=(ratio_1 * tokens_1 + ratio_2 * tokens_2) / max(tokens_1 + tokens_2, 1),
        sync_seconds=report.seconds,
        stale_logprob_diff=stale,
        changed_after_second_sync=not torch.equal(first.sampling_logprobs, second.sampling_logprobs),
        tokens_compared=tokens_1 + tokens_2,
        sync_bytes=report.bytes,
    )


def _check_worker(plan: SyncCheckPlan, layouts: list[ParallelConfig]) -> list[SyncCheckResult | None]:
    """All layouts in these processes, with one vLLM engine (on global rank 0) for all of them."""
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.rollout.engine import RolloutEngine
    from megatron_rlhf.rollout.weight_sync import WeightSync, WeightSyncConfig

    initialize_parallel(layouts[0], seed=plan.seed)
    engine = sync = None
    try:
        if torch.distributed.get_rank() == 0:
            engine = RolloutEngine(RolloutConfig(model_dir=plan.hf_dir, tensor_parallel=plan.engine_tensor_parallel,
                                                 max_model_len=128, seed=plan.seed,
                                                 weight_transfer_backend=plan.weight_transfer_backend))
        sync = WeightSync(engine, WeightSyncConfig(bucket_bytes=plan.bucket_bytes))
        sync.connect()
        return [_check_layout(plan, parallel, engine, sync) for parallel in layouts]
    finally:
        if sync is not None:
            sync.shutdown()
        if engine is not None:
            engine.shutdown()


def run_sync_checks(plan: SyncCheckPlan, layouts: list[ParallelConfig], world_size: int,
                    launcher: Launcher | None = None) -> list[SyncCheckResult]:
    """Check several layouts in one set of ``world_size`` processes (DP takes the remainder).

    ``launcher`` runs the worker on those ranks (default: ``spawn``, fresh processes; tests pass a
    rank pool's ``run``)."""
    from megatron_rlhf.models.arch import arch_spec_from_hf_dir
    from megatron_rlhf.models.provider import ModelBuildConfig, validate_layout
    from megatron_rlhf.parallel.launch import spawn

    arch = arch_spec_from_hf_dir(plan.hf_dir)
    for parallel in layouts:
        validate_layout(arch, parallel, ModelBuildConfig())
        parallel.data_parallel(world_size)  # raises when the layout does not fit
    return (launcher or spawn)(_check_worker, world_size, plan, layouts)[0]


def run_sync_check(plan: SyncCheckPlan) -> SyncCheckResult:
    """Run the check at ``plan.parallel`` in ``TP x PP x EP`` local processes."""
    return run_sync_checks(plan, [plan.parallel], plan.parallel.minimal_world_size)[0]


def check_weight_sync(hf_dir: str, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                      expert_parallel: int = 1, engine_tensor_parallel: int = 1,
                      tolerance: float = DEFAULT_TOLERANCE, weight_transfer_backend: str = "auto") -> SyncCheckResult:
    """The user command: raises :class:`WeightSyncCheckFailed` above ``tolerance``."""
    plan = SyncCheckPlan(
        hf_dir=hf_dir,
        parallel=ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                expert_parallel=expert_parallel),
        engine_tensor_parallel=engine_tensor_parallel,
        weight_transfer_backend=weight_transfer_backend,
    )
    result = run_sync_check(plan)
    if not result.max_abs_logprob_diff <= tolerance or not result.changed_after_second_sync:
        raise WeightSyncCheckFailed(result, tolerance)
    return result
