"""Typed role proxies: what the RL controller calls instead of naming worker methods in strings.

:class:`ActorGroup`, :class:`ReferenceGroup` and :class:`CriticGroup` wrap a
:class:`~megatron_rlhf.workers.group.WorkerGroup` of the matching worker class and give the
controller typed calls (``actor.logprobs_and_entropy(batch) -> (Tensor, Tensor)``,
``reference.logprobs(batch) -> Tensor``, ``critic.values(batch) -> Tensor``, their issued-now forms
``reference.start_logprobs(batch)`` / ``critic.start_values(batch)`` (a :class:`PendingResult`, so
the actor's pass runs meanwhile),
``actor.update(batch, experience, kl_coef, algorithm) -> list[OptimizerStepStats]``, ...).

Data-parallel dispatch (guaranteed): a batch is split into one share per DP replica with
:func:`~megatron_rlhf.parallel.data_dispatch.balanced_shards` (balanced by tokens, PPO minibatch
boundaries kept, deterministic); each share is put into the object store once and handed only to
the ranks of its replica (its TP/PP/CP peers get the same share, no rank receives another
replica's samples); the shares of a batch are put once per step and reused by every call and
role that splits it the same way (:mod:`.share_store`); per-sample results are read back only
from the rank that holds each replica's results (TP 0, CP 0, last pipeline stage; the others
return None) and reassembled in the original sample order. The same batch always gives the same split, so log-probs, values and
the update of one step see the same shares.

Not guaranteed: shares are balanced by token count, not by measured time.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from megatron_rlhf.parallel.data_dispatch import (
    RankLayout,
    balanced_shards,
    output_ranks,
    reassemble,
    sample_tokens,
)
from megatron_rlhf.types import RolloutBatch
from megatron_rlhf.workers.share_store import ShareStore


class PendingResult:
    """Calls issued to every rank of a group and not waited for yet: the controller can start
    another group's pass (they run in other processes) before it calls :meth:`result`."""

    def __init__(self, refs: list[Any], finish: Any):
        self._refs = refs
        self._finish = finish

    def result(self) -> Any:
        """Wait for every rank; the call's result, as the blocking call returns it."""
        import ray

        return self._finish(ray.get(self._refs))

    def then(self, function: Any) -> PendingResult:
        """These calls, their result passed through ``function``."""
        return PendingResult(self._refs, lambda results: function(self._finish(results)))


class RoleGroup:
    """A worker group seen by the controller: dispatch by DP rank, results from output ranks."""

    def __init__(self, group: Any, minibatches: int | None = None, shares: ShareStore | None = None):
        self.group = group
        self.shares = shares if shares is not None else ShareStore()
        """Where the batch's shares are put once (the run's roles share one: :mod:`.share_store`)."""
        self.name = group.name
        self.layouts: list[RankLayout] = group.all("rank_layout")
        self.minibatches: int = minibatches if minibatches is not None else group.call("ppo_minibatches")
        """PPO minibatches per update: shares keep their boundaries (same split for every call).
        None: the run's (``RoleWorkerSpec.update``), so that a reference with the actor's data
        parallelism is handed the actor's shares, and gives its log-probs bit for bit."""
        self.holders = output_ranks(self.layouts)

    @property
    def dp_size(self) -> int:
        return self.layouts[0].dp_size

    def shards(self, batch: RolloutBatch) -> list[list[int]]:
        """Sample indices of each DP replica's share of ``batch``."""
        groups = self.minibatches if batch.num_samples % (self.minibatches * self.dp_size) == 0 else 1
        return balanced_shards(sample_tokens(batch).tolist(), self.dp_size, groups)

    def _start(self, method: str, shares: Sequence[tuple], *common: Any) -> list[Any]:
        """Issue ``method(*shares[dp_rank], *common)`` on every rank; the calls' refs by rank."""
        import ray

        stored = [[part if isinstance(part, ray.ObjectRef) else ray.put(part) for part in share] for share in shares]
        return [
            getattr(worker, method).remote(*stored[layout.dp_rank], *common)
            for worker, layout in zip(self.group.workers, self.layouts)
        ]

    def _sharded(self, method: str, shares: Sequence[tuple], *common: Any) -> list[Any]:
        """Call ``method(*shares[dp_rank], *common)`` on every rank; the output ranks' results by DP rank."""
        import ray

        results = ray.get(self._start(method, shares, *common))
        return [results[holder.rank] for holder in self.holders]

    def _start_per_sample(self, method: str, batch: RolloutBatch) -> PendingResult:
        """:meth:`_per_sample`, issued now and waited for by ``result()``."""
        shards = self.shards(batch)
        refs = self._start(method, [(share,) for share in self.shares.rollout_shares(batch, shards)])

        def reassembled(results: list[Any]) -> list[torch.Tensor]:
            held = [results[holder.rank] for holder in self.holders]
            if isinstance(held[0], torch.Tensor):
                return [reassemble(held, shards)]
            return [reassemble([result[i] for result in held], shards) for i in range(len(held[0]))]

        return PendingResult(refs, reassembled)

    def _per_sample(self, method: str, batch: RolloutBatch) -> list[torch.Tensor]:
        """Per-sample tensor results of ``method(share)``, reassembled in batch order (one per output)."""
        return self._start_per_sample(method, batch).result()

    def _update_shares(self, batch: RolloutBatch, experience: Any) -> tuple[list[list[int]], list[tuple]]:
        """Each DP replica's ``(rollout share, experience share)`` for an update, and the shards."""
        shards = self.shards(batch)
        return shards, [(share, experience.select(torch.as_tensor(shard, dtype=torch.long)))
                        for share, shard in zip(self.shares.rollout_shares(batch, shards), shards)]

    def _update(self, batch: RolloutBatch, experience: Any, *common: Any) -> list[Any]:
        _, shares = self._update_shares(batch, experience)
        return self._sharded("update", shares, *common)[0]  # identical on every rank

    def _rank0(self, method: str, *args: Any) -> Any:
        """A collective control call (checkpointing, export): every rank runs it, rank 0 answers."""
        return self.group.all(method, *args)[0]

    def save_state(self, run_dir: str, name: str, step: int, extra_state: dict, keep_last: int) -> str:
        return self._rank0("save_state", run_dir, name, step, extra_state, keep_last)

    def load_state(self, run_dir: str, name: str, step: int | None) -> tuple[int, dict] | None:
        return self._rank0("load_state", run_dir, name, step)

    def gpu_metrics(self) -> list[dict[str, float]]:
        """Every rank's GPU metrics since the last call (empty dicts without a GPU)."""
        return self.group.all("gpu_metrics")

    def shutdown(self) -> None:
        self.group.shutdown()


class ReferenceGroup(RoleGroup):
    """The frozen reference policy (KL anchor): by default split like the actor (see :class:`RoleGroup`)."""

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """``[B, R]`` float32 reference log-probs of the responses (0.0 on padding)."""
        return self._per_sample("logprobs", batch)[0]

    def start_logprobs(self, batch: RolloutBatch) -> PendingResult:
        """:meth:`logprobs`, issued now: ``result()`` waits for it (another group's pass may run meanwhile)."""
        return self._start_per_sample("logprobs", batch).then(lambda outputs: outputs[0])


class CriticGroup(RoleGroup):
    """The PPO value model."""

    def values(self, batch: RolloutBatch) -> torch.Tensor:
        """``[B, R]`` float32 values before each response token (0.0 on padding)."""
        return self._per_sample("values", batch)[0]

    def start_values(self, batch: RolloutBatch) -> PendingResult:
        """:meth:`values`, issued now: ``result()`` waits for it (another group's pass may run meanwhile)."""
        return self._start_per_sample("values", batch).then(lambda outputs: outputs[0])

    def update(self, batch: RolloutBatch, experience: Any, algorithm: Any = None) -> list[Any]:
        """PPO epochs of critic updates; each DP replica trains on its share."""
        return self._update(batch, experience, algorithm)


class ActorGroup(RoleGroup):
    """The policy: rollout (engine on rank 0), log-probs, updates, weight sync, export."""

    def attach_engine(self, rollout_config: Any | None, remote: Any | None, bucket_bytes: int) -> None:
        """Start the colocated engine on rank 0 (or use ``remote``) and open the transfer group."""
        self.group.all("attach_engine", rollout_config, remote, bucket_bytes)

    def generate(self, prompts: list, settings: Any) -> RolloutBatch:
        """Sample ``settings.n`` responses per prompt with the engine."""
        return self._rank0("generate", prompts, settings)

    def generate_stream(self, prompts: list, settings: Any) -> Any:
        """:meth:`generate` as :mod:`~megatron_rlhf.rollout.stream` events, each as the engine
        finishes it (only rank 0 is called: the other ranks have nothing to do in a rollout)."""
        from megatron_rlhf.workers.rollout_worker import stream_from_ray

        return stream_from_ray(self.group.workers[0].generate_stream, prompts, settings)

    def logprobs_and_entropy(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, R], [B, R])`` float32 log-probs and policy entropy per response token."""
        logprobs, entropy = self._per_sample("logprobs_and_entropy", batch)
        return logprobs, entropy

    def update(self, batch: RolloutBatch, experience: Any, kl_coef: float, algorithm: Any = None) -> list[Any]:
        """PPO epochs of actor updates; each DP replica trains on its share."""
        return self._update(batch, experience, kl_coef, algorithm)

    def old_logprob_pass_reason(self, algorithm: Any) -> str | None:
        """Why a step under ``algorithm`` needs the old-policy log-prob pass; None: it may skip it
        and call :meth:`update_on_policy` (``megatron_rlhf.config.ppo_update.old_logprob_pass_reason``)."""
        return self._rank0("old_logprob_pass_reason", algorithm)

    def update_on_policy(self, batch: RolloutBatch, experience: Any, kl_coef: float,
                         algorithm: Any = None) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
        """One on-policy actor step with no old-policy pass before it: ``(stats, logprobs [B, R],
        entropy [B, R])``, the log-probs and entropy of the update's own forward, in batch order."""
        shards, shares = self._update_shares(batch, experience)
        held = self._sharded("update_on_policy", shares, kl_coef, algorithm)
        return held[0][0], reassemble([h[1] for h in held], shards), reassemble([h[2] for h in held], shards)

    def sync_weights(self, wait: bool = True) -> dict[str, Any]:
        """Megatron -> engine weight transfer (no disk); the transfer's report. ``wait=False``: a
        disaggregated ``shm`` engine may still be loading when this returns; its Ray handles are
        under ``"pending"`` (wait for them before generating: ``rollout_worker.wait_engine_calls``)."""
        return self._rank0("sync_weights", wait)

    def export_hf(self, out_dir: str) -> str | None:
        """Write the policy as a Hugging Face directory; its path."""
        return self._rank0("export_hf", out_dir)
