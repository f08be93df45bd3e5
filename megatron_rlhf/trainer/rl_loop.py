"""The RL run: a Ray single controller around :func:`~megatron_rlhf.trainer.rl_step.rl_step`.

:func:`run_rl` starts (or joins) Ray, builds the worker groups (actor with the vLLM engine,
reference, critic for PPO) on placement groups, the hybrid reward router, the prompt sampler
(curriculum or uniform) and the metrics sinks; resumes from the newest complete checkpoint under
``out_dir`` if there is one; runs the steps; checkpoints every ``checkpoint_every`` steps and at
the end; and writes the final policy as a Hugging Face directory (``<out_dir>/policy``).

Resume guarantee (deterministic CPU mode, same layout): the actor's weights, Adam state, LR
schedule and RNG streams, the critic's, the prompt sampler's position, the KL controller, the
per-domain reward statistics, the reward router's state (``running_zscore`` moments and the
infra-error window) and the sync-alarm count come back exactly; the engine receives the restored weights before
the first resumed step and sampling seeds are derived from the step number, so the resumed steps
compute the same rewards and losses as an uninterrupted run.

Weight-sync check: every step compares the trainer's log-probs of the sampled tokens with the
engine's sampling log-probs (both come from the same weights, synced at the end of the previous
step) and reports the largest difference and the mean importance ratio; above
``sync_alarm_logprob_diff`` it warns, or stops the run (``sync_alarm_action: stop``).

One-step-off-policy rollouts (``rollout_mode: one_step_off``, :mod:`.one_step_off`): the
engines generate step k+1 while step k trains; the weight-sync check is made on steps whose
samples come from the trainer's current weights (staleness 0). A checkpoint holds the sampler
from before the batch in flight; that batch is discarded when the run ends or stops, and a
resumed run regenerates it with the restored weights (that step is on-policy, so a resumed
one-step-off run is not bit-identical to an uninterrupted one).

Checkpoint order: the critic (PPO) is saved before the actor, and the actor's checkpoint carries
the loop state; resume takes the actor's newest complete step and loads the critic at that step.

Start-up timeline: :mod:`.startup_timeline`. Fault injection for the resume tests:
:mod:`.fault_injection`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from megatron_rlhf.trainer.fault_injection import fault_hook_from_env
from megatron_rlhf.trainer.rl_config import RLConfig
from megatron_rlhf.trainer.startup_timeline import StartupTimeline

log = logging.getLogger(__name__)
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class RLResult:
    policy_dir: str
    """The final policy as a Hugging Face directory."""
    metrics_file: str
    steps_run: int
    resumed_from: int | None


def _start_ray(config: RLConfig) -> bool:
    """Join ``config.ray_address`` (else the cluster named by RAY_ADDRESS, as set by
    scripts/slurm/ray_job.sbatch), or start a private local Ray instance (``address="local"``:
    never another cluster of this machine); returns whether this call connected."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False,
                 log_to_driver=True, logging_level=logging.WARNING)  # never attach to another cluster
    return True


def build_components(config: RLConfig, tokenizer: Any, timeline: StartupTimeline | None = None):
    """Worker groups, engine and router; returns ``(components, groups, placement)``; marks the
    ``workers``, ``actor``, ``engine`` and ``groups`` phases on ``timeline`` (if given).

    The groups start together (``WorkerGroup(join=False)`` then ``begin_join``): every rank of
    every group loads its model at the same time. A colocated CPU engine starts on the actor's
    rank 0 as soon as that rank has joined its process group, while the models load
    (:meth:`~megatron_rlhf.workers.megatron_worker.ActorWorker.stage_engine`); a colocated GPU
    engine starts once the actor is loaded and before the other groups load (vLLM sizes its
    memory from what is free); disaggregated engines start with the groups.
    """
    from concurrent.futures import ThreadPoolExecutor, wait

    import ray

    from megatron_rlhf.rewards.reward_config import build_sources
    from megatron_rlhf.rewards.router import HybridRewardRouter
    from megatron_rlhf.config.cpu_split import BIND_ENV, usable_cores
    from megatron_rlhf.config.rollout import RolloutConfig
    from megatron_rlhf.trainer.rl_step import RLComponents
    from megatron_rlhf.config.precision import engine_dtype
    from megatron_rlhf.workers.group import WorkerGroup
    from megatron_rlhf.workers.megatron_worker import ActorWorker, CriticWorker, ReferenceWorker, RoleWorkerSpec
    from megatron_rlhf.workers.placement import plan_run_placement
    from megatron_rlhf.workers.reward_worker import (
        SOURCE_KIND,
        RemoteRewardSource,
        RewardModelWorker,
        reward_model_spec,
    )
    from megatron_rlhf.workers.role_proxies import ActorGroup, CriticGroup, ReferenceGroup
    from megatron_rlhf.workers.rollout_worker import RolloutWorker
    from megatron_rlhf.workers.share_store import ShareStore

    algorithm = config.algorithm
    reward = config.reward_config  # parsed once, when the run config was loaded
    sizes = {"actor": config.actor.world_size}
    if algorithm.kl_mode != "none":
        sizes["reference"] = config.reference.world_size
    if algorithm.needs_critic:
        sizes["critic"] = config.critic.world_size
    sizes.update({f"reward:{name}": source.config.tensor_parallel for name, source in reward.sources.items()
                  if source.kind == SOURCE_KIND})
    disaggregated = config.placement == "disaggregated"
    run_placement = plan_run_placement(config.resources, config.placement, sizes,
                                       config.engine_tensor_parallels if disaggregated else ())
    placement = run_placement.trainers
    threads_of = config.run_threads(sizes, usable_cores(), os.environ.get(BIND_ENV))
    log.info("threads: %s", threads_of.describe())  # once, at start-up
    binds = [bind for bind, _ in threads_of.engine_binds]
    common = dict(algorithm=algorithm, update=config.update, temperature=config.temperature, seed=config.seed,
                  precision=config.precision)
    policy_tokens = len(tokenizer)  # the policy's tokenizer, counted here once instead of in every rank
    groups: dict[str, Any] = {}
    # a step's batch shares, put into the object store once for every role (one-step-off runs also
    # dispatch the next step's batch to the reference during this step)
    shares = ShareStore(recent=2 if config.rollout_mode == "one_step_off" else 1)
    threads, engine_start = ThreadPoolExecutor(1, thread_name_prefix="engine-start"), None
    try:  # every group (and the disaggregated engines) starts and loads at once
        actor_spec = RoleWorkerSpec(hf_dir=config.policy_dir, parallel=config.actor.parallel,
                                    optimizer=config.actor_optimizer, threads=threads_of.group_threads["actor"],
                                    tokenizer_size=policy_tokens, **common)
        groups["actor"] = WorkerGroup("actor", ActorWorker, config.actor.world_size, placement, (actor_spec,),
                                      join=False)
        rollout = RolloutConfig(model_dir=config.policy_dir, tensor_parallel=config.engine_tensor_parallel,
                                max_model_len=config.max_prompt_tokens + config.max_new_tokens,
                                max_prompt_tokens=config.max_prompt_tokens, overlong_prompts="drop",
                                seed=config.seed, dtype=engine_dtype(config.precision),
                                gpu_memory_utilization=config.resources.gpu_memory_utilization,
                                enable_sleep_mode=not disaggregated and config.resources.uses_gpus,
                                cpu_threads_bind="auto" if disaggregated else binds[0],
                                engine_process=config.engine_process)
        engine_names = [f"rollout{i}" if i else "rollout" for i in range(len(run_placement.engines))]
        engine_names = engine_names if disaggregated else []
        for i, (name, tp) in enumerate(zip(engine_names, config.engine_tensor_parallels)):
            engine_config = replace(rollout, tensor_parallel=tp, seed=config.seed + i,  # one Ray actor per engine
                                    cpu_threads_bind=binds[i])
            groups[name] = WorkerGroup(name, RolloutWorker, 1, run_placement.engines[i], (engine_config,), join=False)
        if algorithm.kl_mode != "none":
            reference_spec = RoleWorkerSpec(hf_dir=config.policy_dir, parallel=config.reference.parallel,
                                            threads=threads_of.group_threads["reference"],
                                            tokenizer_size=policy_tokens, **common)
            groups["reference"] = WorkerGroup("reference", ReferenceWorker, config.reference.world_size,
                                              placement, (reference_spec,), join=False)
        if algorithm.needs_critic:
            critic_spec = RoleWorkerSpec(hf_dir=config.critic_dir or config.policy_dir, parallel=config.critic.parallel,
                                         optimizer=config.critic_optimizer, threads=threads_of.group_threads["critic"],
                                         tokenizer_size=None if config.critic_dir else policy_tokens, **common)
            groups["critic"] = WorkerGroup("critic", CriticWorker, config.critic.world_size, placement,
                                           (critic_spec,), join=False)
        for name, source in reward.sources.items():
            if source.kind == SOURCE_KIND:
                spec = reward_model_spec(source.config, config.seed, threads_of.group_threads[f"reward:{name}"])
                groups[f"reward:{name}"] = WorkerGroup(f"reward:{name}", RewardModelWorker, source.config.tensor_parallel,
                                                       placement, (spec,), join=False)
        # vLLM sizes its GPU memory from what is free when it starts: a colocated GPU engine starts
        # before the other groups load (as one after another did); elsewhere all load at once, and
        # a colocated CPU engine starts on the actor's rank 0 while that rank loads its model
        engine_first = not disaggregated and config.resources.uses_gpus
        staged = groups["actor"].all_async("stage_engine", rollout) if not disaggregated and not engine_first else []
        timeline = timeline or StartupTimeline()
        joining = {name: group.begin_join() for name, group in groups.items()
                   if name == "actor" or not engine_first}
        timeline.mark("workers")
        ray.get(staged + joining.pop("actor"))
        timeline.mark("actor")
        groups["actor"] = ActorGroup(groups["actor"], config.update.num_minibatches, shares)
        engine_start = threads.submit(groups["actor"].attach_engine, None if disaggregated else rollout,
                                      [groups[name].workers[0] for name in engine_names] or None,
                                      config.weight_sync_bucket_bytes)
        if engine_first:
            engine_start.result()
            timeline.mark("engine")
            joining = {name: group.begin_join() for name, group in groups.items() if name != "actor"}
        ray.get([ref for refs in joining.values() for ref in refs])
        timeline.mark("groups")
        if "reference" in groups:
            groups["reference"] = ReferenceGroup(groups["reference"], shares=shares)
        if "critic" in groups:
            groups["critic"] = CriticGroup(groups["critic"], config.update.num_minibatches, shares)
        sources = {name: RemoteRewardSource(name, groups[f"reward:{name}"])
                   for name, source in reward.sources.items() if source.kind == SOURCE_KIND}
        sources.update(build_sources(reward, only={n for n, s in reward.sources.items() if s.kind != SOURCE_KIND}))
        router = HybridRewardRouter(reward.router, sources)
        if not engine_first:
            engine_start.result()
            timeline.mark("engine")
    except BaseException:
        if engine_start is not None:
            engine_start.cancel()
            wait([engine_start])  # before its groups go (a failed start has nothing to wait for)
        shutdown_groups(groups, run_placement)
        raise
    finally:
        threads.shutdown(wait=False)
    parts = RLComponents(actor=groups["actor"], reference=groups.get("reference"), critic=groups.get("critic"),
                         router=router, tokenizer=tokenizer, algorithm=algorithm, sampling=config.sampling)
    return parts, groups, run_placement


def one_step_off_rollouts(config: RLConfig, groups: dict[str, Any], sampler: Any, parts: Any, step: int):
    """The one-step-off-policy rollout schedule over the disaggregated engines, driven from here
    (not through the actor's rank 0, which is busy training while they generate)."""
    from megatron_rlhf.rollout.engine_pool import EnginePool
    from megatron_rlhf.trainer.one_step_off import OneStepOffRollouts
    from megatron_rlhf.workers.rollout_worker import RemoteEngine

    if config.algorithm.rollout_is == "none":
        log.warning("rollout_mode: one_step_off without algorithm.rollout_is: the policy loss does not correct "
                    "for samples drawn by weights one update older (set rollout_is: token or sequence)")
    engines = [RemoteEngine(group.workers[0]) for name, group in groups.items() if name.startswith("rollout")]
    engine = engines[0] if len(engines) == 1 else EnginePool(engines)

    def sampling_for(at: int):  # each step's own seed, as in synchronous mode
        return replace(parts.sampling, seed=config.seed + SEED_STRIDE * at)

    early = parts.reference.start_logprobs if parts.reference is not None else None  # frozen: any time
    return OneStepOffRollouts(engine, sampler, sampling_for, parts.tokenizer, parts.router, parts.chat_template,
                              last_step=config.steps, engine_version=step, early_passes=early)


def gpu_metrics(groups: dict[str, Any]) -> dict[str, float]:
    """Per-rank GPU metrics of the Megatron groups since the last call (empty on CPU runs)."""
    merged: dict[str, float] = {}
    for name in ("actor", "reference", "critic"):
        if name in groups:
            for rank_metrics in groups[name].gpu_metrics():
                merged.update(rank_metrics)
    return merged


def shutdown_groups(groups: dict[str, Any], placement: Any) -> None:
    for group in groups.values():
        group.shutdown()
    placement.remove()


def make_sampler(config: RLConfig, tokenizer: Any):
    from megatron_rlhf.data.curriculum import CurriculumSampler
    from megatron_rlhf.data.prompts import PromptDatasetConfig, PromptSampler, load_prompt_datasets

    records, stats = load_prompt_datasets(list(config.prompt_files),
                                          PromptDatasetConfig(max_prompt_tokens=config.max_prompt_tokens), tokenizer)
    for item in stats:
        log.info("%s", item.summary())
    if not records:
        raise ValueError(f"no valid prompts in {list(config.prompt_files)}")
    if config.curriculum is not None:
        return CurriculumSampler.from_records(records, config.curriculum, config.prompts_per_step, seed=config.seed)
    return PromptSampler(records, config.prompts_per_step, seed=config.seed)


def run_rl(config: RLConfig) -> RLResult:
    """Run (or resume) the RL job described by ``config``."""
    from transformers import AutoTokenizer

    from megatron_rlhf.algorithms import DomainRewardStats, build_kl_controller
    from megatron_rlhf.planning.fit_check import check_rl_config_fits
    from megatron_rlhf.trainer.metrics_log import MetricsLogConfig, MetricsLogger, seconds_since_process_start
    from megatron_rlhf.trainer.rl_step import RLState, rl_step

    check_rl_config_fits(config)  # layout and GPU memory, before any process starts
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(config.policy_dir)
    sampler = make_sampler(config, tokenizer)
    from megatron_rlhf.config.precision import validate_precision_environment

    validate_precision_environment(config.precision)  # before any process starts
    timeline = StartupTimeline()
    timeline.mark("prompts")
    started_ray = _start_ray(config)
    timeline.mark("ray")
    try:
        parts, groups, placement = build_components(config, tokenizer, timeline)  # shuts its groups down if it fails
    except BaseException:
        if started_ray:
            import ray

            ray.shutdown()
        raise
    rollouts = None
    try:
        algorithm = config.algorithm
        state = RLState(kl_controller=build_kl_controller(algorithm.kl_controller, algorithm.kl_coef,
                                                          algorithm.kl_target, algorithm.kl_horizon),
                        domain_stats=DomainRewardStats())
        alarms = 0
        resumed = _resume(config, groups, sampler, state, parts.router)
        if resumed is not None:
            state, alarms = resumed
            groups["actor"].sync_weights()  # the engine starts from the initial weights
        parts.on_phase = fault_hook_from_env()
        if config.rollout_mode == "one_step_off":
            rollouts = one_step_off_rollouts(config, groups, sampler, parts, state.step)
        first_step = state.step
        logger = MetricsLogger(
            MetricsLogConfig(output_dir=str(out_dir), console=config.console, total_steps=config.steps,
                             tensorboard=config.tensorboard, wandb=config.wandb,
                             console_keys=("reward/mean", "kl/mean", "entropy/mean", "response/length_mean")),
            resume_step=first_step - 1 if first_step else None,
            run_config=_plain(asdict(config)),
        )
        with logger:
            while state.step < config.steps:
                # vLLM seeds the n samples of a request seed, seed + 1, ...: strides keep steps apart
                parts.sampling = replace(parts.sampling, seed=config.seed + SEED_STRIDE * state.step)
                if rollouts is None:
                    metrics, state = rl_step(parts, state, sampler.next_batch())
                else:  # the batch generated during the previous step; the next starts in the step
                    metrics, state = rl_step(parts, state, None, rollouts)
                metrics.update(gpu_metrics(groups))
                if state.step == first_step + 1:  # start-up included: the command's start to here
                    metrics["time/to_first_step"] = seconds_since_process_start()
                    metrics.update(timeline.metrics())
                alarm = sync_alarm(config, metrics)
                metrics["ratio/sync_alarms"] = alarms = alarms + bool(alarm)
                logger.log(state.step - 1, metrics)
                last = state.step == config.steps
                if last or (config.checkpoint_every and state.step % config.checkpoint_every == 0):
                    if parts.on_phase is not None:
                        parts.on_phase("checkpoint", state.step)
                    _save(config, groups, sampler, state, parts.router, alarms, rollouts)
                if alarm and config.sync_alarm_action == "stop":
                    raise RuntimeError(alarm)
        policy_dir = groups["actor"].export_hf(str(out_dir / "policy"))
        return RLResult(policy_dir=policy_dir, metrics_file=str(logger.jsonl_path),
                        steps_run=state.step - first_step, resumed_from=first_step if resumed is not None else None)
    finally:
        if rollouts is not None:
            rollouts.close()  # the batch in flight is discarded (a resumed run regenerates it)
        parts.router.close()
        shutdown_groups(groups, placement)
        if started_ray:
            import ray

            ray.shutdown()


def sync_alarm(config: RLConfig, metrics: dict[str, float]) -> str | None:
    """The weight-sync consistency check on the step's own samples (module docstring): a message
    when the trainer's and the engine's log-probs of the sampled tokens disagree, else None."""
    difference = metrics.get("ratio/engine_max_abs_logprob_diff", 0.0)
    if metrics.get("rollout/staleness", 0.0) > 0:  # sampled by older weights: a gap is expected
        return None
    if config.sync_alarm_logprob_diff is None or difference <= config.sync_alarm_logprob_diff:
        return None
    message = (f"weight-sync check: trainer and engine log-probs of the sampled tokens differ by {difference:.4g} "
               f"(> sync_alarm_logprob_diff={config.sync_alarm_logprob_diff}); mean importance ratio "
               f"{metrics.get('ratio/engine_mean', float('nan')):.4f}")
    log.warning("%s", message)
    return message


def _loop_state(sampler: Any, state: Any, router: Any, alarms: int, rollouts: Any = None) -> dict[str, Any]:
    """Everything besides the models that changes what later steps compute or log (one-step-off:
    the sampler as it was before the batch in flight drew its prompts)."""
    return {
        "step": state.step,
        "sampler": rollouts.sampler_state() if rollouts is not None else sampler.state_dict(),
        "kl_coef": float(state.kl_controller.value),
        "domain_stats": state.domain_stats.to_dict() if state.domain_stats is not None else {},
        "domains": list(state.domains),
        "router": router.state_dict(),  # running_zscore moments, infra-error window
        "sync_alarms": alarms,
    }


def _save(config: RLConfig, groups: dict[str, Any], sampler: Any, state: Any, router: Any, alarms: int,
          rollouts: Any = None) -> None:
    run_dir = str(Path(config.out_dir) / "state")
    if "critic" in groups:
        groups["critic"].save_state(run_dir, "critic", state.step, {}, config.keep_checkpoints)
    groups["actor"].save_state(run_dir, "actor", state.step, _loop_state(sampler, state, router, alarms, rollouts),
                         config.keep_checkpoints)


def _resume(config: RLConfig, groups: dict[str, Any], sampler: Any, fresh: Any, router: Any):
    """``(state, sync alarms so far)`` from the newest complete checkpoint (models, sampler and
    router restored in place), or None when there is none."""
    from dataclasses import replace as dc_replace

    from megatron_rlhf.algorithms import DomainRewardStats

    run_dir = str(Path(config.out_dir) / "state")
    loaded = groups["actor"].load_state(run_dir, "actor", None)
    if loaded is None:
        return None
    step, extra = loaded
    if "critic" in groups:
        critic_step = groups["critic"].load_state(run_dir, "critic", step)
        if critic_step is None or critic_step[0] != step:
            raise RuntimeError(f"the critic has no complete checkpoint at the actor's step {step} under {run_dir}")
    sampler.load_state_dict(extra["sampler"])
    router.load_state_dict(extra["router"])
    controller = dc_replace(fresh.kl_controller, value=float(extra["kl_coef"]))
    log.info("resumed from step %d (%s)", step, run_dir)
    state = type(fresh)(step=int(extra["step"]), kl_controller=controller,
                        domain_stats=DomainRewardStats.from_dict(extra["domain_stats"]),
                        domains=list(extra["domains"]))
    return state, int(extra["sync_alarms"])


def _plain(value: Any) -> Any:
    """JSON-able copy of a config (tuples to lists, other objects to strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
