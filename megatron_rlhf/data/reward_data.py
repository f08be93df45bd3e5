"""Reward-model training data: JSONL schemas, parsers, tokenisation with step boundaries, batches.

Three record kinds, one JSON object per line (extra fields are ignored; ``domain`` defaults to
``"general"``):

- preference pair ``{"prompt", "chosen", "rejected", "domain"?}``: Bradley-Terry supervision;
- labelled response ``{"prompt", "response", "label": 0|1, "domain"?}``: outcome (correctness)
  supervision, binary cross-entropy on sigmoid(score);
- step-labelled response ``{"prompt", "steps": [str, ...], "step_labels": [p, ...], "label"?,
  "domain"?}``: process supervision (``p`` in [0, 1], e.g. Monte-Carlo success rates); the response
  is the steps joined by the step separator; the outcome label is ``label`` when given, else the
  last step label.

:func:`read_reward_file` reads a file that may mix the kinds (told apart by their fields) through
:func:`~megatron_rlhf.data.jsonl.read_jsonl`, so every malformed line is reported as ``file:line:
reason``.

Tokenisation (:func:`tokenize_response`): the prompt (through the tokenizer's chat template, or
plain text after BOS) followed by the response cut into steps at the separator, each step encoded
on its own (the separator stays at the end of its step), then EOS. The same function serves
training and scoring, so a response is tokenised identically in both. Boundary positions: the
last token of every step but the last, then the final token of the sequence, which carries the
outcome. Whitespace-only pieces between separators join the step before them.

Guarantees: :class:`SequenceBatch` rows are right padded; ``boundary_positions[i, n_i - 1] ==
lengths[i] - 1`` for every row; targets lie in [0, 1]. Not guaranteed: a step containing the
separator is refused at parse time (it would split differently when scored), but a tokenizer
that merges characters across the separator is not detected (steps are encoded separately).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_rlhf.data.jsonl import ParsedDataset, RecordError, read_jsonl, require_str

PROMPT_FORMATS = ("chat", "plain")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    """The preferred response."""
    rejected: str
    domain: str = "general"


@dataclass(frozen=True)
class LabelledResponse:
    prompt: str
    response: str
    label: int
    """1: the response is correct / acceptable; 0: it is not."""
    domain: str = "general"


@dataclass(frozen=True)
class StepLabelledResponse:
    prompt: str
    steps: tuple[str, ...]
    """Reasoning steps, in order; none empty or containing the step separator."""
    step_labels: tuple[float, ...]
    """Per step, the probability in [0, 1] that the solution is still on a correct path."""
    label: int | None = None
    """Outcome label (0/1) of the whole response; None: use the last step label."""
    domain: str = "general"

    @property
    def outcome(self) -> float:
        return float(self.label) if self.label is not None else self.step_labels[-1]


RewardRecord = PreferencePair | LabelledResponse | StepLabelledResponse


def _domain(record: Mapping[str, Any]) -> str:
    return require_str(record, "domain") if "domain" in record else "general"


def _binary_label(value: Any, name: str = "label") -> int:
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    raise RecordError(f"field {name!r} must be 0 or 1 (a number, not true/false), got {value!r}")


def parse_preference_pair(record: Mapping[str, Any]) -> PreferencePair:
    chosen, rejected = require_str(record, "chosen"), require_str(record, "rejected")
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are the same text: the pair prefers nothing")
    return PreferencePair(require_str(record, "prompt"), chosen, rejected, _domain(record))


def parse_labelled_response(record: Mapping[str, Any]) -> LabelledResponse:
    return LabelledResponse(
        require_str(record, "prompt"),
        require_str(record, "response", allow_empty=True),
        _binary_label(record["label"]),
        _domain(record),
    )


def parse_step_labelled_response(
    record: Mapping[str, Any], separator: str = "\n"
) -> StepLabelledResponse:
    steps, labels = record["steps"], record["step_labels"]
    if not isinstance(steps, list) or not steps:
        raise RecordError("field 'steps' must be a non-empty list of strings")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise RecordError(
            f"field 'step_labels' must be a list with one number per step ({len(steps)} steps)"
        )
    for index, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise RecordError(f"step {index} must be a non-empty string, got {step!r}")
        if separator in step:
            raise RecordError(f"step {index} contains the step separator {separator!r}")
    for index, value in enumerate(labels):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"step_labels[{index}] must be a number in [0, 1], got {value!r}")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise RecordError(f"step_labels[{index}]={value!r} is not in [0, 1]")
    label = None if record.get("label") is None else _binary_label(record["label"])
    return StepLabelledResponse(
        require_str(record, "prompt"),
        tuple(steps),
        tuple(float(value) for value in labels),
        label,
        _domain(record),
    )


def parse_reward_record(record: Mapping[str, Any], separator: str = "\n") -> RewardRecord:
    """Any of the three kinds, told apart by ``chosen`` / ``steps`` / ``response``."""
    if "chosen" in record or "rejected" in record:
        return parse_preference_pair(record)
    if "steps" in record:
        return parse_step_labelled_response(record, separator)
    if "response" in record:
        return parse_labelled_response(record)
    raise RecordError(
        "not a reward record: expected 'chosen'/'rejected' (preference pair), 'response' + "
        "'label' (labelled response) or 'steps' + 'step_labels' (step-labelled response)"
    )


def read_reward_file(
    path: str | Path, separator: str = "\n", strict: bool = True
) -> ParsedDataset[RewardRecord]:
    """Parse a reward JSONL file (kinds may be mixed); malformed lines name ``file:line``."""
    return read_jsonl(path, partial(parse_reward_record, separator=separator), strict=strict)


# ----------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class RewardTokenization:
    """How prompts and responses become token sequences."""

    step_separator: str = "\n"
    """String that ends a reasoning step (kept at the end of its step); non-empty."""
    prompt_format: str = "chat"
    """chat: the tokenizer's chat template (user turn + generation prompt); plain: BOS + text."""
    append_eos: bool = True
    """End every sequence with the tokenizer's EOS token (then the final token is EOS)."""
    max_length: int = 1024
    """Longest sequence in tokens; longer training records are dropped (and counted). >= 2."""

    def __post_init__(self) -> None:
        if not isinstance(self.step_separator, str) or not self.step_separator:
            raise ValueError(f"step_separator must be a non-empty string, got {self.step_separator!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={self.prompt_format!r} (choose from {PROMPT_FORMATS})")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")


@dataclass(frozen=True)
class TokenizedSequence:
    input_ids: tuple[int, ...]
    boundaries: tuple[int, ...]
    """Token index ending each step; the last entry is the final token ``len(input_ids) - 1``."""


@dataclass(frozen=True)
class TokenizedLabelled:
    sequence: TokenizedSequence
    targets: tuple[float, ...]
    """One target in [0, 1] per boundary (the last is the outcome label)."""
    supervised: tuple[bool, ...]
    """Which boundaries are trained: every step of step-labelled records, else only the final."""


def split_steps(response: str, separator: str) -> list[str]:
    """``response`` cut after each separator; the pieces concatenate back to ``response``."""
    pieces = response.split(separator)
    steps: list[str] = []
    pending = ""
    for index, piece in enumerate(pieces):
        text = piece + (separator if index < len(pieces) - 1 else "")
        if piece.strip():
            steps.append(pending + text)
            pending = ""
        elif steps:
            steps[-1] += text
        else:
            pending += text
    return steps or [pending]


def encode_prompt(tokenizer: Any, prompt: str, config: RewardTokenization) -> list[int]:
    if config.prompt_format == "chat":
        messages = [{"role": "user", "content": prompt}]
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + list(tokenizer.encode(prompt, add_special_tokens=False))


def tokenize_steps(
    tokenizer: Any, prompt: str, steps: Sequence[str], config: RewardTokenization
) -> TokenizedSequence:
    """Prompt + each step (already cut, separators included) + EOS, with step boundaries."""
    input_ids = encode_prompt(tokenizer, prompt, config)
    boundaries = []
    for step in steps:
        input_ids += tokenizer.encode(step, add_special_tokens=False)
        boundaries.append(len(input_ids) - 1)
    if config.append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer defines no eos token")
        input_ids.append(tokenizer.eos_token_id)
    kept = [position for position in boundaries[:-1] if position < len(input_ids) - 1]
    return TokenizedSequence(tuple(input_ids), tuple(kept) + (len(input_ids) - 1,))


def tokenize_response(
    tokenizer: Any, prompt: str, response: str, config: RewardTokenization
) -> TokenizedSequence:
    return tokenize_steps(tokenizer, prompt, split_steps(response, config.step_separator), config)


def tokenize_labelled(
    tokenizer: Any, record: LabelledResponse | StepLabelledResponse, config: RewardTokenization
) -> TokenizedLabelled:
    if isinstance(record, LabelledResponse):
        sequence = tokenize_response(tokenizer, record.prompt, record.response, config)
        count = len(sequence.boundaries)
        targets = (0.0,) * (count - 1) + (float(record.label),)
        return TokenizedLabelled(sequence, targets, (False,) * (count - 1) + (True,))
    separator = config.step_separator
    steps = [step + separator for step in record.steps[:-1]] + [record.steps[-1]]
    sequence = tokenize_steps(tokenizer, record.prompt, steps, config)
    targets = record.step_labels[:-1] + (record.outcome,)
    if len(sequence.boundaries) != len(targets):
        raise ValueError(f"a step of {record.prompt[:40]!r}... encodes to no tokens")
    return TokenizedLabelled(sequence, tuple(targets), (True,) * len(targets))


@dataclass
class TokenizedRewardData:
    """A data set ready for batching; records longer than ``max_length`` are left out."""

    pairs: list[tuple[TokenizedSequence, TokenizedSequence]] = field(default_factory=list)
    """(chosen, rejected) per preference pair."""
    labelled: list[TokenizedLabelled] = field(default_factory=list)
    """Labelled and step-labelled responses."""
    dropped_too_long: int = 0


def tokenize_records(
    tokenizer: Any, records: Sequence[RewardRecord], config: RewardTokenization
) -> TokenizedRewardData:
    data = TokenizedRewardData()
    for record in records:
        if isinstance(record, PreferencePair):
            chosen = tokenize_response(tokenizer, record.prompt, record.chosen, config)
            rejected = tokenize_response(tokenizer, record.prompt, record.rejected, config)
            if max(len(chosen.input_ids), len(rejected.input_ids)) > config.max_length:
                data.dropped_too_long += 1
            else:
                data.pairs.append((chosen, rejected))
        else:
            labelled = tokenize_labelled(tokenizer, record, config)
            if len(labelled.sequence.input_ids) > config.max_length:
                data.dropped_too_long += 1
            else:
                data.labelled.append(labelled)
    return data


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class SequenceBatch:
    input_ids: Tensor  # [N, T] long, right padded with the pad id
    lengths: Tensor  # [N] long, real tokens per row (>= 1); the final token is at lengths - 1
    boundary_positions: Tensor  # [N, K] long, token index ending each step; -1 padding

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: Tensor) -> SequenceBatch:
        return SequenceBatch(self.input_ids[rows], self.lengths[rows], self.boundary_positions[rows])


@dataclass(frozen=True)
class PreferenceBatch:
    chosen: SequenceBatch  # [P, T]
    rejected: SequenceBatch  # [P, T], row i is the rejected response of pair i


@dataclass(frozen=True)
class LabelledBatch:
    sequences: SequenceBatch  # [L, T]
    targets: Tensor  # [L, K] float in [0, 1] at each boundary; the last valid one is the outcome
    supervised: Tensor  # [L, K] bool, boundaries that carry a training target

    @property
    def outcome_targets(self) -> Tensor:
        """``[L]`` outcome label of each row (target at its final token)."""
        last = (self.sequences.boundary_positions >= 0).sum(1) - 1
        return self.targets.gather(1, last.unsqueeze(1)).squeeze(1)


def collate_sequences(
    sequences: Sequence[TokenizedSequence],
    pad_token_id: int,
    length: int | None = None,
    num_boundaries: int | None = None,
) -> SequenceBatch:
    """Right-pad to ``length`` tokens (default: the longest) and ``num_boundaries`` steps."""
    length = length or max(len(s.input_ids) for s in sequences)
    width = num_boundaries or max(len(s.boundaries) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    positions = torch.full((len(sequences), width), -1, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence.input_ids) > length or len(sequence.boundaries) > width:
            raise ValueError(f"row {row} does not fit [{length} tokens, {width} steps]")
        input_ids[row, : len(sequence.input_ids)] = torch.tensor(sequence.input_ids)
        positions[row, : len(sequence.boundaries)] = torch.tensor(sequence.boundaries)
    lengths = torch.tensor([len(s.input_ids) for s in sequences], dtype=torch.long)
    return SequenceBatch(input_ids, lengths, positions)


def collate_pairs(
    pairs: Sequence[tuple[TokenizedSequence, TokenizedSequence]],
    pad_token_id: int,
    length: int | None = None,
    num_boundaries: int | None = None,
) -> PreferenceBatch:
    every = [s for pair in pairs for s in pair]
    length = length or max(len(s.input_ids) for s in every)
    width = num_boundaries or max(len(s.boundaries) for s in every)
    return PreferenceBatch(
        collate_sequences([c for c, _ in pairs], pad_token_id, length, width),
        collate_sequences([r for _, r in pairs], pad_token_id, length, width),
    )


def collate_labelled(
    records: Sequence[TokenizedLabelled],
    pad_token_id: int,
    length: int | None = None,
    num_boundaries: int | None = None,
) -> LabelledBatch:
    sequences = collate_sequences([r.sequence for r in records], pad_token_id, length, num_boundaries)
    width = sequences.boundary_positions.shape[1]
    targets = torch.zeros(len(records), width)
    supervised = torch.zeros(len(records), width, dtype=torch.bool)
    for row, record in enumerate(records):
        targets[row, : len(record.targets)] = torch.tensor(record.targets)
        supervised[row, : len(record.supervised)] = torch.tensor(record.supervised)
    return LabelledBatch(sequences, targets, supervised)


class MixedBatchSampler:
    """Indices of the pairs and labelled responses of each optimizer step.

    Each stream is drawn without replacement in a fresh seeded permutation per pass over it, so
    step ``s`` is a pure function of ``(seed, s)``: resuming at a step needs only the step number.
    """

    def __init__(self, num_pairs: int, num_labelled: int, pairs_per_step: int, labelled_per_step: int, seed: int):
        for name, count, per_step in (
            ("preference pairs", num_pairs, pairs_per_step),
            ("labelled responses", num_labelled, labelled_per_step),
        ):
            if per_step and count < per_step:
                raise ValueError(f"a step needs {per_step} {name} but the training data has {count}")
        self.streams = ((num_pairs, pairs_per_step, seed), (num_labelled, labelled_per_step, seed + 1))

    @staticmethod
    def _draw(count: int, per_step: int, seed: int, step: int) -> list[int]:
        if per_step == 0:
            return []
        epoch, index = divmod(step, count // per_step)
        order = list(range(count))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return order[index * per_step : (index + 1) * per_step]

    def step(self, step: int) -> tuple[list[int], list[int]]:
        """(pair indices, labelled indices) of optimizer step ``step`` (0-based)."""
        pairs, labelled = (self._draw(count, per, seed, step) for count, per, seed in self.streams)
        return pairs, labelled
