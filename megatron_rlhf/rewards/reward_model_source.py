"""``kind: reward_model`` in a reward YAML: a trained ORM/PRM (a ``train-rm`` checkpoint).

The same YAML entry is accepted by every command that reads reward configs. ``train-rl`` serves
it from a worker group of its own (``workers/reward_worker.py``); the file-scoring commands
(``score``, ``label-steps``) use :class:`SpawnedRewardModelSource`, which scores each batch in
``tensor_parallel`` freshly started local processes (the reward model is loaded once per batch:
fine for offline scoring, not for a training loop).

:func:`check_reward_model_checkpoint` is the pre-flight check of such a directory: it reads only
small metadata files, so a wrong path is refused before any process starts.

Guarantee: one result per sample, in order; a failure of the scoring processes makes every
sample of the batch an INFRA_ERROR (the learned source's guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megatron_rlhf.config.errors import MissingInput, UserError

SOURCE_KIND = "reward_model"


@dataclass(frozen=True)
class RewardModelSourceConfig:
    """``kind: reward_model`` in a reward YAML: a trained ORM/PRM."""

    ckpt_dir: str
    """A ``train-rm`` output checkpoint directory (reward or prm role)."""
    aggregate: str = "last"
    """PRM: last | min | product."""
    output: str = "logit"
    """ORM: logit | probability."""
    micro_batch_size: int = 8
    """Responses per forward pass. >= 1."""
    tensor_parallel: int = 1
    """TP size of the processes (or worker group) that hold the model. >= 1."""

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.tensor_parallel < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} and tensor_parallel="
                             f"{self.tensor_parallel} must be >= 1")


def check_reward_model_checkpoint(ckpt_dir: str, where: str) -> None:
    """UserError naming ``where`` unless ``ckpt_dir`` is a ``train-rm`` checkpoint of a reward
    role whose tokenizer is present (reads metadata only)."""
    from megatron_rlhf.checkpoint.dist_ckpt import check_shard_files, read_checkpoint_metadata
    from megatron_rlhf.rewards.learned import read_reward_model_info

    path = Path(ckpt_dir)
    if not path.is_dir():
        raise MissingInput(f"{where}: {ckpt_dir} is not a directory (expected a train-rm checkpoint)")
    try:
        metadata = read_checkpoint_metadata(ckpt_dir)
        read_reward_model_info(ckpt_dir)
        check_shard_files(ckpt_dir)
    except (ValueError, OSError) as error:
        raise UserError(f"{where}: {ckpt_dir} is not a reward-model checkpoint written by train-rm ({error})") from None
    if metadata.role not in ("reward", "prm"):
        raise UserError(f"{where}: {ckpt_dir} holds a {metadata.role!r} model, not a reward model (reward or prm)")
    if not (path / "hf" / "tokenizer_config.json").is_file():
        raise MissingInput(f"{where}: {ckpt_dir}/hf has no tokenizer (tokenizer_config.json)")


def score_in_this_rank(config: RewardModelSourceConfig, samples: Sequence[Any]) -> list[Any]:
    """Score ``samples`` on this rank of a freshly started process group (see :func:`spawn`)."""
    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.parallel.init import initialize_parallel
    from megatron_rlhf.rewards.learned import LearnedRewardConfig, load_learned_reward_source

    parallel = ParallelConfig(tensor_parallel=config.tensor_parallel)
    initialize_parallel(parallel)
    source = load_learned_reward_source(
        config.ckpt_dir, parallel, config=LearnedRewardConfig(aggregate=config.aggregate, output=config.output),
        micro_batch_size=config.micro_batch_size,
    )
    results = []
    for start in range(0, len(samples), 256):
        results.extend(source.score(samples[start : start + 256]))
    return results


class SpawnedRewardModelSource:
    """A reward model scored in local processes started per batch (file-scoring commands)."""

    def __init__(self, config: RewardModelSourceConfig):
        check_reward_model_checkpoint(config.ckpt_dir, f"reward_model source {config.ckpt_dir}")
        self.config = config
        self.name = SOURCE_KIND

    def score(self, samples: Sequence[Any]) -> list[Any]:
        from megatron_rlhf.parallel.launch import DistributedLaunchError, spawn
        from megatron_rlhf.rewards.sample import RewardResult, RewardStatus, Verdict

        if not samples:
            return []
        try:
            return spawn(score_in_this_rank, self.config.tensor_parallel, self.config, list(samples))[0]
        except DistributedLaunchError as error:  # a scorer failure is an INFRA_ERROR, never a 0
            failed = RewardResult(None, RewardStatus.INFRA_ERROR, Verdict.SCORER_ERROR, f"reward model: {error}")
            return [failed] * len(samples)

    def close(self) -> None:
        """Nothing stays up between batches."""
