"""Outcome (ORM) and process (PRM) reward-model training on Megatron-Core, under any TP/PP/DP layout.

Loss, as in "Does RLHF Scale?" (GLM team), a multi-task objective on mixed batches:

* preference pairs: Bradley-Terry ``-log sigmoid(r_chosen - r_rejected)``, where ``r`` is the
  score at the final token (both roles: for the PRM, preference data keep outcome supervision);
* labelled responses: binary cross-entropy on ``sigmoid(r)`` against the 0/1 label. The ``reward``
  role (ORM) is trained at the final token only (a step-labelled record gives its outcome); the
  ``prm`` role at every supervised step boundary and at the final token (soft targets in [0, 1]).

``loss = preference_weight * mean_pairs(BT) + classification_weight * mean_targets(BCE)``; the
mixing ratio is set by the rows per microbatch (``pairs_per_microbatch`` : ``responses_per_microbatch``)
and the two weights (:class:`RewardTrainingConfig`).

Layout of a step: every rank receives the whole global batch (``microbatches_per_step`` x the
rows per microbatch). Global microbatch ``g`` holds pairs ``g*p .. g*p+p-1`` (chosen rows, then
rejected rows) and labelled rows ``g*l .. g*l+l-1``; DP rank ``d`` runs global microbatches
``d*m .. d*m+m-1`` with ``m = microbatches_per_step / dp``, all padded to the batch's longest
sequence. Exact normalisation (the same gradient at every layout, as in :mod:`.actor_critic`):
each microbatch contributes ``sum(BT) / P_global`` and ``sum(BCE) / targets_global`` (counts over
the whole global batch, known locally), times ``m * dp`` to undo Megatron's division by the
number of microbatches and DDP's average over DP. The reported step loss is the exact global
value (summed over microbatches and DP, broadcast over PP).

Packing (``RewardTrainingConfig.packing``): each training microbatch's rows (the same rows as
padded) are concatenated into one THD row without padding (:mod:`megatron_rlhf.models.packing`);
final-token scores are read at each row's end in the pack and PRM boundaries are moved into it,
so the loss, gradient and weights are those of the padded path up to float summation order. The
step reports ``padding_fraction`` either way. Scoring and evaluation stay padded.

Scoring (:class:`~megatron_rlhf.rewards.scorer.RewardScorer`, re-exported here): the rows are sharded over DP, scored with Megatron's forward
schedules and gathered, so every rank gets every score. ORM: one logit per response. PRM: a logit
per step boundary (the last is the final token) and :func:`aggregate_step_scores` of the step
probabilities (last | min | product). Checkpoints: :func:`~megatron_rlhf.checkpoint.dist_ckpt.save_model_checkpoint`
(model weights only; optimizer state is not saved, so a run cannot resume bit-exactly).

Non-finite values: a NaN/Inf loss or gradient on any rank skips the step on every rank (see
:class:`~megatron_rlhf.training.megatron_step.MegatronUpdater`); it is reported with ``skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_rlhf.data.reward_data import LabelledBatch, PreferenceBatch, SequenceBatch
from megatron_rlhf.evaluation.classification import pairwise_accuracy, roc_auc
from megatron_rlhf.models.heads import gather_at_positions, last_token_scores
from megatron_rlhf.config.optimizer import OptimizerSettings
from megatron_rlhf.models.sequence_padding import schedule_seq_length
from megatron_rlhf.parallel.pipeline import broadcast_from_last_stage
from megatron_rlhf.training.megatron_step import MegatronUpdater

# re-exported: the scoring side moved to rewards/scorer.py, the old import path keeps working
from megatron_rlhf.rewards.scorer import (  # noqa: F401
    AGGREGATES,
    TRAINABLE_ROLES,
    RewardScorer,
    SequenceScores,
    aggregate_step_scores,
)


@dataclass(frozen=True)
class RewardTrainingConfig:
    """Composition of a global batch and the weights of the two loss terms."""

    pairs_per_microbatch: int = 1
    """Preference pairs in each microbatch (2 rows each); 0 for no Bradley-Terry term. >= 0."""
    responses_per_microbatch: int = 1
    """Labelled / step-labelled responses in each microbatch; 0 for no BCE term. >= 0."""
    microbatches_per_step: int = 1
    """Microbatches per optimizer step over all DP ranks; a multiple of the DP size. >= 1."""
    preference_weight: float = 1.0
    """Weight of the mean Bradley-Terry loss over the step's pairs. >= 0."""
    classification_weight: float = 1.0
    """Weight of the mean BCE over the step's supervised targets. >= 0."""
    score_micro_batch_size: int = 8
    """Rows per forward microbatch when scoring / validating. >= 1."""
    packing: bool = False
    """Pack each training microbatch's rows into one row without padding (THD); see the module
    docstring. The rows per microbatch stay ``2 * pairs_per_microbatch + responses_per_microbatch``."""

    def __post_init__(self) -> None:
        for name in ("pairs_per_microbatch", "responses_per_microbatch"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("microbatches_per_step", "score_micro_batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.pairs_per_microbatch + self.responses_per_microbatch == 0:
            raise ValueError("pairs_per_microbatch and responses_per_microbatch are both 0")
        for name in ("preference_weight", "classification_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    @property
    def pairs_per_step(self) -> int:
        return self.pairs_per_microbatch * self.microbatches_per_step

    @property
    def responses_per_step(self) -> int:
        return self.responses_per_microbatch * self.microbatches_per_step


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def bradley_terry_loss_sum(chosen_logits: Tensor, rejected_logits: Tensor) -> Tensor:
    """``sum_i -log sigmoid(chosen_i - rejected_i)`` over pairs (``[P]`` each) -> ``[]``."""
    return -F.logsigmoid(chosen_logits - rejected_logits).sum()


def classification_loss_sum(logits: Tensor, targets: Tensor, supervised: Tensor) -> Tensor:
    """Binary cross-entropy of ``sigmoid(logits)`` vs ``targets`` summed over ``supervised``
    entries (all ``[L, K]``) -> ``[]``."""
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return torch.where(supervised, losses, torch.zeros_like(losses)).sum()


@dataclass(frozen=True)
class RewardStepStats:
    """One optimizer step; identical on every rank."""

    loss: float
    """Exact weighted loss of the global batch."""
    preference_loss: float
    """Mean Bradley-Terry loss over the step's pairs (0 without pairs)."""
    classification_loss: float
    """Mean BCE over the step's supervised targets (0 without labelled responses)."""
    pair_accuracy: float
    """Fraction of the step's pairs with r_chosen > r_rejected (training batch)."""
    grad_norm: float | None
    learning_rate: float
    skipped: bool
    padding_fraction: float = 0.0
    """1 - real / computed positions of the step's forward, over all DP ranks."""


@dataclass(frozen=True)
class ValidationMetrics:
    pairwise_accuracy: float | None
    """Held-out pairs ranked correctly (ties count 1/2); None without pairs."""
    auc: float | None
    """ROC AUC of the final-token score for the outcome labels; None if undefined."""
    step_auc: float | None
    """PRM: ROC AUC of intermediate step scores for step targets >= 0.5; None otherwise."""


class RewardModelTrainer:
    """Trains a ``reward`` (ORM) or ``prm`` role model; see the module docstring."""

    metric_names = ("loss_share", "preference_loss", "classification_loss", "pair_accuracy")

    def __init__(self, model: torch.nn.Module, optimizer: OptimizerSettings, config: RewardTrainingConfig):
        self.scorer = RewardScorer(model, config.score_micro_batch_size)
        self.model = model
        self.role = self.scorer.role
        self.config = config
        self.updater = MegatronUpdater(model, optimizer)

    @property
    def skipped_steps(self) -> int:
        return self.updater.skipped_steps

    def _rows(self, pairs: PreferenceBatch | None, labelled: LabelledBatch | None):
        """The step's rows: chosen, rejected, labelled, padded to one [rows, T] / [rows, K]."""
        config = self.config
        parts = [pairs.chosen, pairs.rejected] if pairs is not None else []
        parts += [labelled.sequences] if labelled is not None else []
        counts = (
            pairs.chosen.size if pairs is not None else 0,
            labelled.sequences.size if labelled is not None else 0,
        )
        if counts != (config.pairs_per_step, config.responses_per_step):
            raise ValueError(
                f"a step needs {config.pairs_per_step} pairs and {config.responses_per_step} "
                f"labelled responses, got {counts[0]} and {counts[1]}"
            )
        length = max(part.input_ids.shape[1] for part in parts)
        width = max(part.boundary_positions.shape[1] for part in parts)

        def pad(tensor: Tensor, columns: int, value: float) -> Tensor:
            # Token padding only ever follows a row's last real token; attention is causal, so
            # its value (0 here) never changes a score that is read.
            return F.pad(tensor, (0, columns - tensor.shape[1]), value=value)

        sequences = SequenceBatch(
            torch.cat([pad(part.input_ids, length, 0) for part in parts]),
            torch.cat([part.lengths for part in parts]),
            torch.cat([pad(part.boundary_positions, width, -1) for part in parts]),
        )
        targets = torch.zeros(sum(counts) + counts[0], width)
        supervised = torch.zeros(targets.shape, dtype=torch.bool)
        if labelled is not None:
            targets[2 * counts[0] :] = pad(labelled.targets, width, 0.0)
            supervised[2 * counts[0] :] = pad(labelled.supervised, width, False)
            if self.role == "reward":  # outcome only: the final boundary of each row
                final = (labelled.sequences.boundary_positions >= 0).sum(1) - 1
                supervised[2 * counts[0] :] = F.one_hot(final, width).to(torch.bool)
        return sequences, targets, supervised, counts

    def train_step(self, pairs: PreferenceBatch | None, labelled: LabelledBatch | None) -> RewardStepStats:
        """One optimizer step on a global batch (the same on every rank)."""
        from megatron.core import parallel_state

        config = self.config
        dp = parallel_state.get_data_parallel_world_size()
        if config.microbatches_per_step % dp:
            raise ValueError(f"microbatches_per_step={config.microbatches_per_step} is not a multiple of DP={dp}")
        sequences, targets, supervised, (num_pairs, _) = self._rows(pairs, labelled)
        local = config.microbatches_per_step // dp
        first = parallel_state.get_data_parallel_rank() * local
        pairs_each, responses_each = config.pairs_per_microbatch, config.responses_per_microbatch
        device = next(self.model.parameters()).device
        plan = []
        for index in range(first, first + local):
            pair_rows = torch.arange(index * pairs_each, (index + 1) * pairs_each)
            response_rows = torch.arange(index * responses_each, (index + 1) * responses_each)
            plan.append(torch.cat([pair_rows, num_pairs + pair_rows, 2 * num_pairs + response_rows]))
        if config.packing:
            microbatches = self._packed(sequences, plan, device)
            computed = sum(microbatch["computed_tokens"] for microbatch in microbatches)
        else:
            microbatches = [{"input_ids": sequences.input_ids[rows].to(device),
                             "sequence_lengths": sequences.lengths[rows].to(device), "rows": rows} for rows in plan]
            computed = sum(rows.numel() for rows in plan) * schedule_seq_length(self.model.config,
                                                                                 sequences.input_ids.shape[1])
        real = sum(int(sequences.lengths[rows].sum()) for rows in plan)
        norm = (max(num_pairs, 1), max(int(supervised.sum()), 1), local * dp)
        loss_fn = partial(self._microbatch_loss, sequences, targets, supervised, norm)
        return self._stats(self.updater.step(microbatches, loss_fn), real, computed)

    def _packed(self, sequences: SequenceBatch, plan: list[Tensor], device) -> list[dict]:
        """One THD row per microbatch; ``sequence_lengths`` are each row's end in the pack."""
        from megatron.core import parallel_state

        from megatron_rlhf.models.packing import packed_microbatches, packed_to
        from megatron_rlhf.models.sequence_padding import sequence_multiple

        if self.model.config.context_parallel_size > 1:
            raise ValueError("RewardTrainingConfig.packing does not cover context parallelism")
        microbatches = packed_microbatches(sequences.input_ids, sequences.lengths, None, [rows.tolist() for rows in plan],
                                           sequence_multiple(self.model.config),
                                           parallel_state.get_pipeline_model_parallel_world_size() > 1)
        for microbatch, rows in zip(microbatches, plan):
            bounds = microbatch["packed_seq_params"].cu_seqlens_q.long()
            microbatch.update(rows=rows, row_starts=bounds[: rows.numel()],
                              sequence_lengths=bounds[1 : rows.numel() + 1].to(device))
        return [packed_to(microbatch, device) for microbatch in microbatches]

    def _microbatch_loss(self, sequences, targets, supervised, norm, output: Tensor, microbatch: dict):
        """The microbatch's exact share of the global loss, scaled for Megatron and DDP."""
        num_pairs, num_targets, scale = norm
        rows, p = microbatch["rows"], self.config.pairs_per_microbatch
        lengths = microbatch["sequence_lengths"]  # packed: each row's end in the pack
        if self.role != "reward" and output.shape[0] != rows.numel():  # a packed [1, T] serves every row
            output = output.expand(rows.numel(), -1)
        final = output if self.role == "reward" else last_token_scores(output, lengths)
        preference = bradley_terry_loss_sum(final[:p], final[p : 2 * p])
        labelled_rows = rows[2 * p :]
        if self.role == "reward":
            logits = final[2 * p :].unsqueeze(1).expand(-1, targets.shape[1])
        else:
            positions = sequences.boundary_positions[labelled_rows]
            if "row_starts" in microbatch:  # packed: boundaries move to the row's place in the pack
                positions = torch.where(positions >= 0, positions + microbatch["row_starts"][2 * p :, None], positions)
            positions = positions.to(output.device)
            logits = gather_at_positions(output[2 * p :], positions)
        classification = classification_loss_sum(
            logits, targets[labelled_rows].to(logits.device), supervised[labelled_rows].to(logits.device)
        )
        share = (
            self.config.preference_weight * preference / num_pairs
            + self.config.classification_weight * classification / num_targets
        )
        wins = (final[:p] > final[p : 2 * p]).sum().to(share.dtype)
        scaled = share * scale
        return scaled, {
            "loss": scaled.detach(),
            "loss_share": share.detach(),
            "preference_loss": preference.detach() / num_pairs,
            "classification_loss": classification.detach() / num_targets,
            "pair_accuracy": wins / num_pairs,
        }

    def _stats(self, result, real_positions: int, computed_positions: int) -> RewardStepStats:
        """Sum the microbatch shares over microbatches and DP; broadcast from the last stage."""
        from megatron.core import parallel_state

        from megatron_rlhf.models.packing import padding_fraction

        device = next(self.model.parameters()).device
        totals = torch.zeros(len(self.metric_names) + 2, dtype=torch.float64, device=device)
        totals[-2:] = torch.tensor([real_positions, computed_positions], dtype=torch.float64)
        for metrics in result.metrics:
            totals[:-2] += torch.stack([metrics[name].double().reshape(()) for name in self.metric_names]).to(device)
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        *values, real, computed = broadcast_from_last_stage(totals).tolist()
        return RewardStepStats(
            *values,
            grad_norm=None if result.skipped else float(result.grad_norm),
            learning_rate=result.learning_rate,
            skipped=result.skipped,
            padding_fraction=padding_fraction(real, computed),
        )

    def evaluate(self, pairs: PreferenceBatch | None, labelled: LabelledBatch | None) -> ValidationMetrics:
        """Pairwise accuracy on ``pairs``; outcome (and PRM step) AUC on ``labelled``."""
        accuracy = auc = step_auc = None
        if pairs is not None:
            chosen = self.scorer.score(pairs.chosen).final_logits
            accuracy = pairwise_accuracy(chosen, self.scorer.score(pairs.rejected).final_logits)
        if labelled is not None:
            scores = self.scorer.score(labelled.sequences)
            auc = roc_auc(scores.final_logits, (labelled.outcome_targets >= 0.5).long())
            if scores.boundary_logits is not None:
                intermediate = labelled.supervised.clone()
                final = (labelled.sequences.boundary_positions >= 0).sum(1) - 1
                intermediate[torch.arange(intermediate.shape[0]), final] = False
                if bool(intermediate.any()):
                    step_labels = (labelled.targets[intermediate] >= 0.5).long()
                    step_auc = roc_auc(scores.boundary_logits[intermediate], step_labels)
        return ValidationMetrics(accuracy, auc, step_auc)

    def save_checkpoint(self, out_dir: str | Path, metadata, hf_side_dir: str | Path | None) -> None:
        """Collective: a Megatron distributed checkpoint of the model (see module docstring)."""
        from megatron_rlhf.checkpoint.dist_ckpt import save_model_checkpoint

        if metadata.role != self.role:
            raise ValueError(f"checkpoint metadata says role {metadata.role!r}, the model is {self.role!r}")
        save_model_checkpoint(self.model, out_dir, metadata, hf_side_dir)
