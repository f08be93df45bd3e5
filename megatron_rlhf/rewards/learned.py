"""Trained outcome (ORM) and process (PRM) reward models as reward sources for the router.

:class:`LearnedRewardSource` implements :class:`~megatron_rlhf.rewards.interface.RewardSource`
with a :class:`~megatron_rlhf.rewards.scorer.RewardScorer`: each (prompt, response) is
tokenised exactly as in training (:func:`~megatron_rlhf.data.reward_data.tokenize_response`,
same step separator and prompt format) and scored in one batch.

- ORM (``reward`` role): ``reward`` is the final-token logit (``output="logit"``, the
  Bradley-Terry scale) or its sigmoid (``output="probability"``); ``step_rewards`` is None.
- PRM (``prm`` role): ``step_rewards`` holds the probability of every step (the last one read at
  the final token) and ``reward`` their aggregate: ``last`` (the final step), ``min`` or
  ``product`` (:func:`~megatron_rlhf.rewards.scorer.aggregate_step_scores`).

Guarantees: one result per sample, in order; text a model can write never raises (lone
surrogates are replaced before tokenising; a sequence longer than ``max_length`` keeps its last
``max_length`` tokens, drops the steps that fall off and says so in ``detail``); a failure of
the model itself (an exception while scoring) makes every sample of the batch INFRA_ERROR.

Not guaranteed: the scorer is collective. Under TP/PP/DP every rank of the model's job must call
:meth:`LearnedRewardSource.score` with the same samples (as the SPMD RL step does); calling it on
one rank alone blocks. An exception on one rank only is not propagated to the others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from megatron_rlhf.config.errors import MissingInput, UserError
from megatron_rlhf.data.reward_data import (
    RewardTokenization,
    TokenizedSequence,
    collate_sequences,
    tokenize_response,
)
from megatron_rlhf.rewards.sample import (
    RewardResult,
    RewardSample,
    RewardStatus,
    Verdict,
)

OUTPUTS = ("logit", "probability")
REWARD_MODEL_FILE = "reward_model.json"
"""Written next to a trained reward model's checkpoint: role and tokenisation settings."""


@dataclass(frozen=True)
class LearnedRewardConfig:
    aggregate: str = "last"
    """PRM only: how step probabilities become the reward: last | min | product."""
    output: str = "logit"
    """ORM only: logit (unbounded, the Bradley-Terry scale) or probability (sigmoid, in [0, 1])."""

    def __post_init__(self) -> None:
        from megatron_rlhf.rewards.scorer import AGGREGATES

        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate={self.aggregate!r} (choose from {AGGREGATES})")
        if self.output not in OUTPUTS:
            raise ValueError(f"output={self.output!r} (choose from {OUTPUTS})")


def _truncate(sequence: TokenizedSequence, max_length: int) -> tuple[TokenizedSequence, str]:
    """Keep the last ``max_length`` tokens and the boundaries still inside them."""
    excess = len(sequence.input_ids) - max_length
    if excess <= 0:
        return sequence, ""
    kept = tuple(position - excess for position in sequence.boundaries if position >= excess)
    dropped = len(sequence.boundaries) - len(kept)
    detail = f"truncated: kept the last {max_length} of {len(sequence.input_ids)} tokens"
    if dropped:
        detail += f", {dropped} early step(s) not scored"
    return TokenizedSequence(sequence.input_ids[excess:], kept), detail


def _clean(text: str) -> str:
    """Valid UTF-8 text: lone surrogates (undecodable model output) become U+FFFD."""
    return text.encode("utf-8", "replace").decode("utf-8", "replace")


class LearnedRewardSource:
    """A trained ORM or PRM behind the :class:`RewardSource` interface (see module docstring)."""

    def __init__(
        self,
        name: str,
        scorer: Any,
        tokenizer: Any,
        tokenization: RewardTokenization,
        config: LearnedRewardConfig = LearnedRewardConfig(),
    ):
        self.name = name
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.tokenization = tokenization
        self.config = config

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        if not samples:
            return []
        start = time.perf_counter()
        sequences, details = [], []
        for sample in samples:
            sequence = tokenize_response(
                self.tokenizer, _clean(sample.prompt), _clean(sample.response), self.tokenization
            )
            sequence, detail = _truncate(sequence, self.tokenization.max_length)
            sequences.append(sequence)
            details.append(detail)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        try:
            scores = self.scorer.score(collate_sequences(sequences, pad))
        except Exception as error:  # noqa: BLE001 - a scorer failure is an INFRA_ERROR, never a 0
            seconds = (time.perf_counter() - start) / len(samples)
            message = f"{self.name}: scoring failed: {type(error).__name__}: {error}"
            return [RewardResult.infra_error(Verdict.SCORER_ERROR, message, seconds) for _ in samples]
        seconds = (time.perf_counter() - start) / len(samples)
        if scores.boundary_logits is None:
            return self._orm_results(scores.final_logits, details, seconds)
        return self._prm_results(scores, details, seconds)

    def _orm_results(self, logits, details: list[str], seconds: float) -> list[RewardResult]:
        values = logits.sigmoid() if self.config.output == "probability" else logits
        return [
            RewardResult(float(value), RewardStatus.SCORED, Verdict.OK, detail, seconds)
            for value, detail in zip(values.tolist(), details)
        ]

    def _prm_results(self, scores, details: list[str], seconds: float) -> list[RewardResult]:
        from megatron_rlhf.rewards.scorer import aggregate_step_scores

        probabilities = scores.step_probabilities()
        rewards = aggregate_step_scores(probabilities, scores.boundary_mask, self.config.aggregate)
        results = []
        for row, detail in enumerate(details):
            steps = probabilities[row][scores.boundary_mask[row]].tolist()
            results.append(
                RewardResult(
                    float(rewards[row]), RewardStatus.SCORED, Verdict.OK, detail, seconds,
                    step_rewards=tuple(steps),
                )
            )
        return results

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller's job."""


def write_reward_model_info(ckpt_dir: str | Path, role: str, tokenization: RewardTokenization) -> None:
    """Record how a trained reward model tokenises, next to its checkpoint (call on one rank)."""
    info = {"role": role, "tokenization": asdict(tokenization)}
    (Path(ckpt_dir) / REWARD_MODEL_FILE).write_text(json.dumps(info, indent=2))


def read_reward_model_info(ckpt_dir: str | Path) -> RewardTokenization:
    path = Path(ckpt_dir) / REWARD_MODEL_FILE
    if not path.is_file():
        raise MissingInput(f"{path}: not a reward model checkpoint (written by train-rm)")
    try:
        fields = json.loads(path.read_text())["tokenization"]
        return RewardTokenization(**fields)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path}: unreadable reward model settings ({error})") from error


def load_learned_reward_source(
    ckpt_dir: str | Path,
    parallel: Any,
    name: str | None = None,
    config: LearnedRewardConfig = LearnedRewardConfig(),
    micro_batch_size: int = 8,
    max_length: int | None = None,
) -> LearnedRewardSource:
    """Build this rank's stage of a trained reward model from a ``train-rm`` checkpoint, at the
    layout ``parallel`` (a ParallelConfig; Megatron's parallel state must be initialised with it),
    and wrap it as a reward source named ``name`` (default: the role, ``reward`` or ``prm``)."""
    import transformers

    from megatron_rlhf.checkpoint.dist_ckpt import read_checkpoint_metadata
    from megatron_rlhf.checkpoint.role_model import MegatronCheckpoint, load_role_model
    from megatron_rlhf.models.arch import arch_spec_from_hf_config
    from megatron_rlhf.models.provider import ModelBuildConfig
    from megatron_rlhf.rewards.scorer import TRAINABLE_ROLES, RewardScorer

    metadata = read_checkpoint_metadata(ckpt_dir)
    if metadata.role not in TRAINABLE_ROLES:
        raise ValueError(f"{ckpt_dir}: role {metadata.role!r} is not a reward model ({TRAINABLE_ROLES})")
    tokenization = read_reward_model_info(ckpt_dir)
    if max_length is not None:
        tokenization = replace(tokenization, max_length=max_length)
    arch = arch_spec_from_hf_config(metadata.hf_config, source=f"{ckpt_dir}/megatron_rlhf.json")
    build = ModelBuildConfig(
        role=metadata.role,
        transformer_impl=metadata.transformer_impl,
        params_dtype=metadata.params_dtype,
        padded_vocab_size=metadata.padded_vocab_size,
    )
    model = load_role_model(arch, parallel, build, MegatronCheckpoint(str(ckpt_dir))).model
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(Path(ckpt_dir) / "hf"))
    scorer = RewardScorer(model, micro_batch_size)
    return LearnedRewardSource(name or metadata.role, scorer, tokenizer, tokenization, config)
