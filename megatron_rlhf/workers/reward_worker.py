"""Trained reward models (ORM / PRM from ``train-rm``) as Ray worker groups and router sources.

:class:`RewardModelWorker` is one rank of a reward-model group: it joins the group's process
group, builds its stage of the model from the ``train-rm`` checkpoint at the group's layout
(:func:`~megatron_rlhf.rewards.learned.load_learned_reward_source`) and scores samples.
:class:`RemoteRewardSource` is the router-side :class:`~megatron_rlhf.rewards.interface.RewardSource`
that calls every rank of the group at once (scoring is a collective) and returns rank 0's results.

Guarantee: one result per sample, in order; a failure inside the model makes every sample of the
batch an INFRA_ERROR (never a silent reward), as the learned source guarantees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from megatron_rlhf.config.parallel import ParallelConfig
from megatron_rlhf.rewards.reward_model_source import SOURCE_KIND, RewardModelSourceConfig
from megatron_rlhf.workers.megatron_worker import MegatronWorker


# The YAML side of ``kind: reward_model`` lives with the other reward kinds (rewards/).
__all__ = ["SOURCE_KIND", "RewardModelSourceConfig", "RewardModelWorker", "RemoteRewardSource", "reward_model_spec"]


def reward_model_spec(config: RewardModelSourceConfig, seed: int, threads: int = 1) -> "RewardModelSpec":
    """The spec of a reward-model group; ``threads``: torch intra-op threads per rank."""
    return RewardModelSpec(ckpt_dir=config.ckpt_dir, parallel=ParallelConfig(tensor_parallel=config.tensor_parallel),
                           aggregate=config.aggregate, output=config.output,
                           micro_batch_size=config.micro_batch_size, threads=threads, seed=seed)


@dataclass(frozen=True)
class RewardModelSpec:
    ckpt_dir: str
    """A ``train-rm`` output checkpoint directory (reward or prm role)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    aggregate: str = "last"
    """PRM: last | min | product."""
    output: str = "logit"
    """ORM: logit | probability."""
    micro_batch_size: int = 8
    threads: int = 1
    """torch intra-op threads per rank (the run's split: ``RLConfig.run_threads``)."""
    seed: int = 1234


class RewardModelWorker(MegatronWorker):
    """One rank holding a trained reward model."""

    def __init__(self, rank: int, world_size: int, spec: RewardModelSpec):
        self.rank, self.world_size, self.spec = rank, world_size, spec
        self.source = None

    def join_process_group(self, address: str, port: int) -> None:
        import os

        import torch

        from megatron_rlhf.parallel.init import initialize_parallel
        from megatron_rlhf.rewards.learned import LearnedRewardConfig, load_learned_reward_source

        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.rank),
                          MASTER_ADDR=address, MASTER_PORT=str(port))
        torch.set_num_threads(self.spec.threads)
        initialize_parallel(self.spec.parallel, seed=self.spec.seed, store=self.rendezvous_store(address, port))
        self.source = load_learned_reward_source(
            self.spec.ckpt_dir, self.spec.parallel,
            config=LearnedRewardConfig(aggregate=self.spec.aggregate, output=self.spec.output),
            micro_batch_size=self.spec.micro_batch_size,
        )

    def score(self, samples: Sequence[Any]) -> list[Any]:
        return self.source.score(samples)


class RemoteRewardSource:
    """A reward-model worker group seen by the router."""

    def __init__(self, name: str, group: Any):
        self.name = name
        self.group = group

    def score(self, samples: Sequence[Any]) -> list[Any]:
        return self.group.call("score", list(samples)) if samples else []

    def close(self) -> None:
        """The group is shut down with the run's other worker groups."""
