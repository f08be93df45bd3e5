"""One RL step (PPO with a critic, or critic-free GRPO / RLOO / REINFORCE++), top to bottom.

:func:`rl_step` is the RL algorithm written out top to bottom; each phase is a named, timed call into a
typed role proxy (:mod:`megatron_rlhf.workers.role_proxies`: each data-parallel replica gets
only its token-balanced share of the batch, results come back in batch order) or a pure
library function::

    batch   = rollout(prompts, n)                       # vLLM, colocated with the actor (or disaggregated)
    rewards = router.score(samples)                     # verifiers + RM + GenRM, streamed: each group
                                                        # is scored as the engine finishes it
    old_lp  = actor.logprobs(batch)                     # + the policy entropy, same pass; skipped
                                                        # when the update is on-policy (see below)
    ref_lp  = reference.logprobs(batch)                 # KL anchor (unless kl_mode == "none")
    values  = critic.values(batch)                      # PPO only; both issued before the actor's
                                                        # pass and run alongside it (other groups)
    exp     = make_experience(...)                      # clip -> normalise -> baseline -> shrink, KL, advantages
    actor.update(exp); critic.update(exp)
    actor.sync_weights()                                # Megatron -> vLLM, no disk

Only the work a step needs: when the update is on-policy (one epoch, one minibatch, no KL
penalty in the rewards, no dropout: :func:`~megatron_rlhf.config.ppo_update.old_logprob_pass_reason`),
the old-policy pass is skipped; the update takes its own forward's log-probs (detached) as the old
ones, and the step's KL, entropy, engine-mismatch and ``rollout_is/*`` metrics come from that
forward (``actor/old_logprob_pass`` is 0). ``update.force_old_logprob_pass`` keeps the pass.
The reference and critic passes are issued as soon as the batch is generated, on the batch as
sampled, and run in their own worker groups while the last rewards are awaited (the GenRM judge,
the sandbox) and the actor's pass runs: ``time/reference_logprobs`` and ``time/critic_values`` are
the waits left after those. Rows whose reward turns out to be an infrastructure error are masked
out of their results (zeros), as out of everything else.

Samples whose reward is an infrastructure error (``reward is None``: a crashed sandbox, an
unparseable GenRM judgement) are never trained on as a 0: their response mask is cleared and
their reward set to their group's mean of valid rewards (zero advantage); they are counted.

One-step-off-policy mode (:mod:`.one_step_off`): the batch was generated during the previous
step, and the next one is generated during this step's passes and updates (phase "rollout_wait"
waits for it before the weight sync); its reference pass is issued as soon as it is generated,
and the weight sync returns once the weights are packed, the engines loading them while the next
step starts (the next batch's generation waits for that load). The policy loss can correct the engine/trainer mismatch
with truncated importance sampling (``AlgorithmConfig.rollout_is``); ``rollout_is/*`` metrics
report the mismatch KL and the weights every step, ``rollout/staleness`` the updates between the
sampling weights and the trainer's.

Everything the next step needs (KL coefficient, running per-domain reward moments) is returned
in a new :class:`RLState`, which the loop checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from megatron_rlhf.algorithms import AlgorithmConfig, Rollout, make_experience
from megatron_rlhf.data.prompts import PromptRecord
from megatron_rlhf.trainer.metrics_log import PhaseTimer
from megatron_rlhf.trainer.rollout_phase import generate_scored, rollout_correction_metrics
from megatron_rlhf.trainer.rl_metrics import step_metrics
from megatron_rlhf.types import RolloutBatch


@dataclass
class RLState:
    """What an RL run carries from step to step (checkpointed with the models)."""

    step: int = 0
    kl_controller: Any = None
    """A :mod:`megatron_rlhf.algorithms.kl_controllers` controller (its ``value`` is the coefficient)."""
    domain_stats: Any = None
    """:class:`~megatron_rlhf.algorithms.DomainRewardStats` for "domain" normalisation."""
    domains: list[str] = field(default_factory=list)
    """Domain tag of each domain id, in first-seen order (ids are positions here)."""


@dataclass
class RLComponents:
    """The worker groups and services one step calls (built by :mod:`.rl_loop`)."""

    actor: Any
    """:class:`~megatron_rlhf.workers.role_proxies.ActorGroup` (the engine is on its rank 0, or remote)."""
    reference: Any | None
    """:class:`~megatron_rlhf.workers.role_proxies.ReferenceGroup` (None when kl_mode is "none")."""
    critic: Any | None
    """:class:`~megatron_rlhf.workers.role_proxies.CriticGroup` (PPO only)."""
    router: Any
    """A reward source over RewardSample lists (the hybrid router)."""
    tokenizer: Any
    algorithm: AlgorithmConfig
    sampling: Any
    """:class:`~megatron_rlhf.config.sampling.SamplingSettings` (n responses per prompt)."""
    chat_template: bool = True
    """Render prompts as chat messages with the tokenizer's template (False: raw prompt text)."""
    on_phase: Callable[[str, int], None] | None = None
    """Called as each phase starts with ``(phase name, step)`` (tracing, fault-injection tests)."""


def rl_step(parts: RLComponents, state: RLState, prompts: Sequence[PromptRecord] | None,
            rollouts: Any | None = None) -> tuple[dict[str, float], RLState]:
    """Run one step on ``prompts``; returns the step's metrics and the state for the next step.

    ``rollouts``: a :class:`~megatron_rlhf.trainer.one_step_off.OneStepOffRollouts` (then
    ``prompts`` is None: the step trains on the batch it generated during the previous step, and
    starts the next one); None: synchronous (generate now, with weights synced last step).
    """
    timer = PhaseTimer()
    algorithm = parts.algorithm

    @contextmanager
    def phase(name: str):
        with timer.phase(name):
            if parts.on_phase is not None:
                parts.on_phase(name, state.step)
            yield

    staleness, early_ref, load_wait = 0, None, 0.0
    with phase("rollout"):  # each prompt group is scored as soon as the engine finishes it
        if rollouts is None:
            batch, scoring = generate_scored(parts.actor, [p.engine_input(parts.chat_template) for p in prompts], parts.sampling,
                                             prompts, parts.tokenizer, parts.router, state.step)
        else:  # generated during the previous step (one-step-off-policy), its reference pass issued then
            taken = rollouts.take(state.step)
            prompts, batch, scoring = taken.prompts, taken.batch, taken.scoring
            staleness, early_ref, load_wait = taken.staleness, taken.early, taken.load_wait
    step_prompts = [prompts[int(index)] for index in batch.prompt_index]

    # the reference's and critic's passes run in their own worker groups while the last rewards
    # are awaited and the actor's pass runs (rows with an infrastructure-error reward are masked
    # out of their results below)
    pending_ref = None
    if algorithm.kl_mode != "none":
        pending_ref = early_ref if early_ref is not None else parts.reference.start_logprobs(batch)
    pending_values = parts.critic.start_values(batch) if algorithm.needs_critic else None
    with phase("reward"):  # the last groups' scores, then the whole batch's normalisation
        results = scoring.results(batch.num_samples)
        rewards, valid = rewards_tensor(results, batch.group_index)
    if rollouts is not None:
        rollouts.start(state.step + 1)  # the next batch generates while this one trains
    sampled = batch
    batch = replace(batch, response_mask=batch.response_mask * valid.unsqueeze(1).to(batch.response_mask.dtype))
    on_policy = parts.actor.old_logprob_pass_reason(algorithm) is None
    if on_policy:  # the update's own forward gives them (placeholder until then)
        old_logprobs = entropy = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
    else:
        with phase("actor_logprobs"):
            old_logprobs, entropy = parts.actor.logprobs_and_entropy(batch)

    ref_logprobs = values = None
    if pending_ref is not None:
        with phase("reference_logprobs"):  # the wait left once the actor's pass is done
            ref_logprobs = pending_ref.result() * batch.response_mask
    if pending_values is not None:
        with phase("critic_values"):
            values = pending_values.result() * batch.response_mask

    with phase("make_experience"):
        domain_ids, domains = domain_index([p.domain for p in step_prompts], state.domains)
        rollout = Rollout(
            rewards=rewards,
            response_mask=batch.response_mask,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            group_index=batch.group_index,
            domain_ids=domain_ids,
            rollout_logprobs=batch.sampling_logprobs,
        )
        experience, domain_stats = make_experience(
            rollout, algorithm, kl_coef=state.kl_controller.value, domain_stats=state.domain_stats
        )

    kl_coef = state.kl_controller.value
    with phase("actor_update"):
        if on_policy:
            actor_stats, old_logprobs, entropy = parts.actor.update_on_policy(batch, experience, kl_coef, algorithm)
            experience = with_old_logprobs(experience, old_logprobs, algorithm)
        else:
            actor_stats = parts.actor.update(batch, experience, kl_coef, algorithm)

    critic_stats = []
    if algorithm.needs_critic:
        with phase("critic_update"):
            critic_stats = parts.critic.update(batch, experience, algorithm)

    if rollouts is not None:
        with phase("rollout_wait"):  # the engines finish the next batch before taking new weights
            rollouts.wait_generated()
    with phase("weight_sync"):  # one-step-off: the engines may load on while the next step starts
        sync = parts.actor.sync_weights(wait=rollouts is None)
    if rollouts is not None:
        rollouts.synced(state.step + 1, sync.get("pending", ()))

    mean_kl = _masked_mean(experience.kl, experience.response_mask) if experience.kl is not None else 0.0
    controller = state.kl_controller.update(max(mean_kl, 0.0) * _mean_length(experience.response_mask), batch.num_samples)
    metrics = step_metrics(
        batch=sampled,
        prompts=step_prompts,
        results=results,
        experience=experience,
        old_logprobs=old_logprobs,
        entropy=entropy,
        actor_stats=actor_stats,
        critic_stats=critic_stats,
        kl_coef=kl_coef,
        mean_kl=mean_kl,
        weight_sync=sync,
        timings=timer.pop_step(),
    )
    metrics.update(rollout_correction_metrics(old_logprobs, sampled, experience.response_mask, algorithm))
    metrics["rollout/staleness"] = float(staleness)
    if rollouts is not None:
        metrics["time/engine_load_wait"] = load_wait
    metrics["actor/old_logprob_pass"] = float(not on_policy)
    new_state = RLState(step=state.step + 1, kl_controller=controller, domain_stats=domain_stats, domains=domains)
    return metrics, new_state


def with_old_logprobs(experience: Any, old_logprobs: torch.Tensor, algorithm: AlgorithmConfig) -> Any:
    """``experience`` with the old log-probs an on-policy update computed, and the KL to the
    reference taken from them (as :func:`make_experience` takes it from the old-policy pass's)."""
    from megatron_rlhf.algorithms.kl import kl_estimate

    kl = experience.kl
    if algorithm.kl_mode != "none":
        kl = kl_estimate(old_logprobs, experience.ref_logprobs, experience.response_mask, algorithm.kl_estimator)
    return replace(experience, old_logprobs=old_logprobs, kl=kl)


def reward_samples(batch: RolloutBatch, prompts: Sequence[PromptRecord], tokenizer: Any, step: int) -> list:
    """The router's input: decoded responses with each prompt's domain and ground truth."""
    from megatron_rlhf.rewards.sample import RewardSample

    samples = []
    for row, (prompt, response) in enumerate(zip(prompts, batch.texts(tokenizer))):
        samples.append(RewardSample(
            sample_id=f"{step}:{row}:{prompt.id}",
            domain=prompt.domain,
            prompt=prompt.text,
            response=response,
            ground_truth=prompt.ground_truth,
        ))
    return samples


def rewards_tensor(results: Sequence[Any], group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards [B], valid [B] bool)``; an invalid (infra-error) sample gets its group's valid mean."""
    valid = torch.tensor([result.reward is not None for result in results], dtype=torch.bool)
    rewards = torch.tensor([result.reward if result.reward is not None else 0.0 for result in results],
                           dtype=torch.float32)
    for group in torch.unique(group_index[~valid]).tolist():
        members = group_index == group
        good = members & valid
        rewards[members & ~valid] = rewards[good].mean() if good.any() else 0.0
    return rewards, valid


def domain_index(domains: Sequence[str], known: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """Stable integer ids for domain tags (new tags are appended to ``known``)."""
    table = list(known)
    ids = []
    for domain in domains:
        if domain not in table:
            table.append(domain)
        ids.append(table.index(domain))
    return torch.tensor(ids, dtype=torch.long), table


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.to(values.dtype)
    return float((values * mask).sum() / mask.sum().clamp(min=1))


def _mean_length(mask: torch.Tensor) -> float:
    return float(mask.to(torch.float32).sum(dim=1).mean()) if mask.numel() else 0.0

