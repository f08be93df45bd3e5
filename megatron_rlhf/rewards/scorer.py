"""Scoring responses with a trained reward model (ORM) or process reward model (PRM).

:class:`RewardScorer` shards the rows over data-parallel ranks, scores them with Megatron's
forward schedules and gathers the scores, so every rank gets every score. ORM: one logit per
response. PRM: a logit per step boundary (the last is the final token) and
:func:`aggregate_step_scores` of the step probabilities (last | min | product).

It lives with the reward sources (not with the reward-model trainer that produces the model) so
that :mod:`megatron_rlhf.rewards.learned` scores without importing the trainer. Guarantees: every
rank of the model's process groups calls :meth:`RewardScorer.score` together with the same batch
(a collective) and gets the same scores; it computes no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rlhf.data.reward_data import SequenceBatch
from megatron_rlhf.models.heads import gather_at_positions
from megatron_rlhf.parallel.pipeline import broadcast_from_last_stage

TRAINABLE_ROLES = ("reward", "prm")
"""Model roles a reward scorer (and the reward-model trainer) accepts."""
AGGREGATES = ("last", "min", "product")
"""How a PRM's step probabilities become one score per response."""


def aggregate_step_scores(probabilities: Tensor, mask: Tensor, how: str) -> Tensor:
    """``[N, K]`` step probabilities (valid where ``mask``) -> ``[N]``: the last valid step, the
    minimum over steps, or their product."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate={how!r} (choose from {AGGREGATES})")
    if how == "last":
        last = mask.sum(1).clamp(min=1) - 1
        return probabilities.gather(1, last.unsqueeze(1)).squeeze(1)
    if how == "min":
        return torch.where(mask, probabilities, torch.ones_like(probabilities)).amin(1)
    return torch.where(mask, probabilities, torch.ones_like(probabilities)).prod(1)


@dataclass(frozen=True)
class SequenceScores:
    final_logits: Tensor  # [N] score (logit) at each row's final token
    boundary_logits: Tensor | None  # [N, K] PRM logit at each step boundary, 0 at padding
    boundary_mask: Tensor | None  # [N, K] bool, valid boundaries (the last valid one is final)

    def step_probabilities(self) -> Tensor:
        """``[N, K]`` sigmoid of the PRM step logits, 0 at padding (PRM only)."""
        if self.boundary_logits is None or self.boundary_mask is None:
            raise ValueError("step scores exist only for a prm-role model")
        return torch.sigmoid(self.boundary_logits) * self.boundary_mask


class RewardScorer:
    """Scores responses with a ``reward`` or ``prm`` role model; all ranks call it together."""

    def __init__(self, model: torch.nn.Module, micro_batch_size: int = 8):
        role = getattr(model, "role", None)
        if role not in TRAINABLE_ROLES:
            raise ValueError(f"a reward scorer needs a reward or prm role model, got role {role!r}")
        self.model = model
        self.role = role
        self.micro_batch_size = micro_batch_size

    def _collect(self, output: Tensor, microbatch: dict[str, Tensor]) -> Tensor:
        if self.role == "reward":
            return output.float().unsqueeze(1)
        return gather_at_positions(output.float(), microbatch["boundary_positions"].to(output.device))

    @torch.no_grad()
    def score(self, batch: SequenceBatch) -> SequenceScores:
        from megatron.core import parallel_state

        from megatron_rlhf.models.forward import forward_only

        count, size = batch.size, self.micro_batch_size
        if count == 0:
            raise ValueError("nothing to score: the batch has no rows")
        dp = parallel_state.get_data_parallel_world_size()
        shard = -(-count // (dp * size)) * size
        rows = torch.arange(shard * dp).clamp(max=count - 1)  # tail padded with the last row
        local = batch.select(rows[parallel_state.get_data_parallel_rank() * shard :][:shard])
        device = next(self.model.parameters()).device
        microbatches = [
            {"input_ids": ids.to(device), "sequence_lengths": lengths.to(device), "boundary_positions": positions}
            for ids, lengths, positions in zip(
                local.input_ids.split(size), local.lengths.split(size), local.boundary_positions.split(size)
            )
        ]
        outputs = forward_only(self.model, microbatches, self._collect)
        width = 1 if self.role == "reward" else batch.boundary_positions.shape[1]
        gathered = torch.zeros(shard * dp, width, device=device)
        if outputs:
            parts = list(gathered.chunk(dp))
            group = parallel_state.get_data_parallel_group()
            torch.distributed.all_gather(parts, torch.cat(outputs).to(device), group=group)
            gathered = torch.cat(parts)
        logits = broadcast_from_last_stage(gathered)[:count].cpu()
        if self.role == "reward":
            return SequenceScores(logits[:, 0], None, None)
        mask = batch.boundary_positions >= 0
        final = logits.gather(1, (mask.sum(1) - 1).unsqueeze(1)).squeeze(1)
        return SequenceScores(final, logits * mask, mask)
