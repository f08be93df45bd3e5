"""Prompt datasets for RL: one prompt per JSONL line with a domain tag, and a resumable sampler.

Line schema (one JSON object per line)::

    {"id": "m-17",                                  # optional; default "<file stem>:<line>"
     "prompt": "What is 3 + 4?",                    # a string, or instead:
     "messages": [{"role": "user", "content": "..."}],  # system/user/assistant turns, last one user
     "domain": "math",                              # routing tag: math, code, general, ...
     "ground_truth": "7",                           # optional: answer (math), tests (code), ...
     ...}                                           # any other key is kept in ``metadata``

:func:`load_prompt_dataset` reads a file with :func:`~megatron_rlhf.data.jsonl.read_jsonl`
(``strict=False``). Three kinds of bad line are skipped, each logged with ``file:line`` and
counted in the returned :class:`PromptLoadStats`: malformed lines (not JSON, not an object,
missing/ill-typed fields), empty prompts, and prompts longer than ``max_prompt_tokens`` tokens
(counted with the given tokenizer exactly as the rollout engine encodes them). The run proceeds
on the valid records; a file with no valid record at all raises ``ValueError``.

:class:`PromptSampler` yields batches of :class:`PromptRecord` forever, epoch after epoch. Its
position is ``(epoch, offset)``; the order of epoch ``e`` is a permutation drawn from
``random.Random(f"{seed}:{e}")``, so it depends only on (seed, epoch, number of records) and is
identical in every process and Python version (string seeds do not use hash randomisation).
``state_dict``/``load_state_dict`` resume mid-epoch with exactly the continuation an
uninterrupted run would have seen. A batch may straddle two epochs.

Not guaranteed: the sampler does not shard across data-parallel ranks (the controller draws the
global batch); resuming checks that the dataset has the same record ids in the same file order
(a fingerprint), and refuses a different one rather than silently re-mapping the position.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from megatron_rlhf.data.jsonl import (
    MAX_REPORTED,
    MalformedLine,
    RecordError,
    read_jsonl,
    require_str,
)

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
RESERVED_KEYS = ("id", "prompt", "messages", "domain", "ground_truth")


@dataclass(frozen=True)
class PromptRecord:
    """One RL prompt."""

    id: str
    """The line's ``id``, or ``<file stem>:<line>`` when it has none."""
    domain: str
    """Routing tag (math, code, general, ...): picks the reward route and the curriculum bucket."""
    prompt: str | None
    """The prompt text; None when the record gives ``messages`` instead."""
    messages: tuple[Mapping[str, str], ...] | None
    """Chat turns ({"role", "content"}), the last one from the user; None for a ``prompt`` record."""
    ground_truth: Any = None
    """Domain reference: the answer (math), a test specification (code); None for learned RMs."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """The line's other keys."""
    source: str = ""
    """``file:line`` the record came from (for error messages)."""

    def rollout_input(self) -> str | list[dict[str, str]]:
        """What the rollout engine takes: the prompt string, or the list of chat messages."""
        if self.messages is not None:
            return [dict(message) for message in self.messages]
        return self.prompt or ""

    def as_messages(self) -> list[dict[str, str]]:
        """Chat messages; a plain prompt becomes one user message."""
        if self.messages is not None:
            return [dict(message) for message in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def to_row(self) -> dict[str, Any]:
        """The record as a prompt-file row (``load_prompt_dataset`` reads it back to an equal record,
        ``source`` aside): id, domain, metadata keys, the prompt or the messages, the ground truth."""
        row: dict[str, Any] = {"id": self.id, "domain": self.domain, **dict(self.metadata)}
        if self.messages is not None:
            row["messages"] = [dict(message) for message in self.messages]
        else:
            row["prompt"] = self.prompt
        if self.ground_truth is not None:
            row["ground_truth"] = self.ground_truth
        return row

    def engine_input(self, chat_template: bool) -> str | list[dict[str, str]]:
        """What the engine is given for this prompt: chat messages when the run applies the chat
        template, else the raw rollout input. Every caller that generates (RL rollouts, held-out
        evaluation, Best-of-N) goes through here, so they prompt the engine alike."""
        return self.as_messages() if chat_template else self.rollout_input()

    @property
    def text(self) -> str:
        """The prompt as plain text (the messages' contents joined by newlines)."""
        if self.messages is not None:
            return "\n".join(message["content"] for message in self.messages)
        return self.prompt or ""


class PromptTokenizer(Protocol):
    """The part of a Hugging Face tokenizer used to count prompt tokens."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class PromptDatasetConfig:
    """How prompt files are read and filtered."""

    max_prompt_tokens: int | None = None
    """Prompts with more tokens than this are skipped (and reported). None: no length check.
    >= 1; needs a tokenizer."""
    chat_template: bool = True
    """Count tokens of the prompt as rendered by the tokenizer's chat template with a generation
    prompt (a plain prompt as one user message). False: plain prompts are counted as raw text
    without special tokens (messages still use the template), as ``RolloutEngine.encode_prompts``."""
    default_domain: str | None = None
    """Domain given to lines without a ``domain`` key. None: such a line is malformed."""

    def __post_init__(self) -> None:
        if self.max_prompt_tokens is not None and (
            isinstance(self.max_prompt_tokens, bool)
            or not isinstance(self.max_prompt_tokens, int)
            or self.max_prompt_tokens < 1
        ):
            raise ValueError(f"max_prompt_tokens must be a positive integer or None, got {self.max_prompt_tokens!r}")
        if self.default_domain is not None and not (isinstance(self.default_domain, str) and self.default_domain.strip()):
            raise ValueError(f"default_domain must be a non-empty string or None, got {self.default_domain!r}")


@dataclass(frozen=True)
class PromptLoadStats:
    """What happened to each line of one prompt file."""

    path: str
    loaded: int
    """Valid records returned."""
    malformed: tuple[MalformedLine, ...]
    """Lines that are not JSON objects of the schema."""
    empty: tuple[MalformedLine, ...]
    """Lines whose prompt is empty (or only whitespace)."""
    too_long: tuple[MalformedLine, ...]
    """Lines whose prompt has more than ``max_prompt_tokens`` tokens."""
    domains: Mapping[str, int]
    """Domain -> number of loaded records."""

    @property
    def skipped(self) -> int:
        return len(self.malformed) + len(self.empty) + len(self.too_long)

    def summary(self) -> str:
        return (
            f"{self.path}: {self.loaded} prompts loaded ({dict(sorted(self.domains.items()))}), "
            f"skipped {len(self.malformed)} malformed, {len(self.empty)} empty, {len(self.too_long)} too long"
        )


def load_prompt_dataset(
    path: str | Path,
    config: PromptDatasetConfig = PromptDatasetConfig(),
    tokenizer: PromptTokenizer | None = None,
) -> tuple[list[PromptRecord], PromptLoadStats]:
    """Valid prompt records of ``path`` in file order, and what was skipped (see module docstring)."""
    if config.max_prompt_tokens is not None and tokenizer is None:
        raise ValueError(f"max_prompt_tokens={config.max_prompt_tokens} needs a tokenizer to count prompt tokens")
    path = Path(path)
    parsed = read_jsonl(path, lambda raw: _parse_prompt(raw, config.default_domain), strict=False)
    records: list[PromptRecord] = []
    empty: list[MalformedLine] = []
    too_long: list[MalformedLine] = []
    for partial, line in zip(parsed.records, parsed.lines):
        record = _record(partial, path, line)
        if _is_empty(record):
            empty.append(MalformedLine(str(path), line, "empty prompt"))
            continue
        if config.max_prompt_tokens is not None:
            tokens = count_prompt_tokens(record, tokenizer, config.chat_template)
            if tokens > config.max_prompt_tokens:
                too_long.append(MalformedLine(
                    str(path), line, f"prompt of {tokens} tokens is over max_prompt_tokens={config.max_prompt_tokens}"
                ))
                continue
        records.append(record)
    domains: dict[str, int] = {}
    for record in records:
        domains[record.domain] = domains.get(record.domain, 0) + 1
    stats = PromptLoadStats(str(path), len(records), tuple(parsed.malformed), tuple(empty), tuple(too_long), domains)
    _log_skipped(stats)
    if not records:
        first = [*stats.malformed, *stats.empty, *stats.too_long][:3]
        raise ValueError(f"no valid prompt in {path}; " + "; ".join(str(bad) for bad in first) if first
                         else f"no prompt in {path} (the file is empty)")
    return records, stats


def read_prompt_lines(path: str | Path, default_domain: str | None = None) -> list[PromptRecord]:
    """Every non-empty prompt of ``path`` in file order, parsed strictly: a malformed line raises
    :class:`~megatron_rlhf.data.jsonl.DatasetError` naming ``file:line`` (what training checks
    before it starts). No tokenizer: lengths are not checked here."""
    path = Path(path)
    parsed = read_jsonl(path, lambda raw: _parse_prompt(raw, default_domain), strict=True)
    records = [_record(partial, path, line) for partial, line in zip(parsed.records, parsed.lines)]
    return [record for record in records if not _is_empty(record)]


def load_prompt_datasets(
    paths: Sequence[str | Path],
    config: PromptDatasetConfig = PromptDatasetConfig(),
    tokenizer: PromptTokenizer | None = None,
) -> tuple[list[PromptRecord], list[PromptLoadStats]]:
    """:func:`load_prompt_dataset` over several files, records concatenated in the given order."""
    records: list[PromptRecord] = []
    all_stats: list[PromptLoadStats] = []
    for path in paths:
        file_records, stats = load_prompt_dataset(path, config, tokenizer)
        records.extend(file_records)
        all_stats.append(stats)
    return records, all_stats


def count_prompt_tokens(record: PromptRecord, tokenizer: PromptTokenizer, chat_template: bool = True) -> int:
    """Number of tokens the rollout engine feeds for ``record`` (see ``PromptDatasetConfig.chat_template``)."""
    if record.messages is None and not chat_template:
        return len(tokenizer.encode(record.prompt or "", add_special_tokens=False))
    ids = tokenizer.apply_chat_template(record.as_messages(), add_generation_prompt=True, tokenize=True, return_dict=False)
    return len(ids)


# --- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ParsedPrompt:
    id: str | None
    domain: str
    prompt: str | None
    messages: tuple[Mapping[str, str], ...] | None
    ground_truth: Any
    metadata: Mapping[str, Any]


def _parse_prompt(raw: Mapping[str, Any], default_domain: str | None) -> _ParsedPrompt:
    has_prompt, has_messages = "prompt" in raw, "messages" in raw
    if has_prompt == has_messages:
        raise RecordError("a prompt line needs exactly one of 'prompt' (a string) or 'messages' (a list)")
    prompt = require_str(raw, "prompt", allow_empty=True) if has_prompt else None
    messages = _parse_messages(raw["messages"]) if has_messages else None
    if "domain" in raw or default_domain is None:
        domain = require_str(raw, "domain")
    else:
        domain = default_domain
    record_id = raw.get("id")
    if record_id is not None and (isinstance(record_id, bool) or not isinstance(record_id, (str, int))):
        raise RecordError(f"field 'id' must be a string or integer, got {type(record_id).__name__}")
    metadata = {key: value for key, value in raw.items() if key not in RESERVED_KEYS}
    return _ParsedPrompt(
        None if record_id is None else str(record_id), domain.strip(), prompt, messages,
        raw.get("ground_truth"), metadata,
    )


def _record(partial: _ParsedPrompt, path: Path, line: int) -> PromptRecord:
    return PromptRecord(
        id=partial.id if partial.id is not None else f"{path.stem}:{line}",
        domain=partial.domain, prompt=partial.prompt, messages=partial.messages,
        ground_truth=partial.ground_truth, metadata=partial.metadata, source=f"{path}:{line}",
    )


def _parse_messages(messages: Any) -> tuple[Mapping[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'messages' must be a non-empty list of {role, content} objects")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"messages[{index}] must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise RecordError(f"messages[{index}].role must be one of {CHAT_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise RecordError(f"messages[{index}].content must be a string, got {type(content).__name__}")
        parsed.append({"role": role, "content": content})
    if parsed[-1]["role"] != "user":
        raise RecordError(f"the last message of a prompt must be from the user, got {parsed[-1]['role']!r}")
    return tuple(parsed)


def _is_empty(record: PromptRecord) -> bool:
    if record.messages is not None:
        return not record.messages[-1]["content"].strip()
    return not (record.prompt or "").strip()


def _log_skipped(stats: PromptLoadStats) -> None:
    for kind, problems in (("malformed", stats.malformed), ("empty", stats.empty), ("too long", stats.too_long)):
        for problem in problems[:MAX_REPORTED]:
            log.warning("skipped %s prompt line %s", kind, problem)
        if len(problems) > MAX_REPORTED:
            log.warning("... and %d more %s prompt lines in %s", len(problems) - MAX_REPORTED, kind, stats.path)
    log.info("%s", stats.summary())


# --- sampling ---------------------------------------------------------------------------------


def dataset_fingerprint(records: Sequence[PromptRecord]) -> str:
    """Short hash of the records' ids in order (resume refuses a different dataset)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.id.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:16]


class PromptSampler:
    """Deterministic, resumable stream of prompt batches (see the module docstring)."""

    def __init__(self, records: Sequence[PromptRecord], batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if not records:
            raise ValueError("a PromptSampler needs at least one record")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.records = list(records)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.fingerprint = dataset_fingerprint(self.records)
        self.epoch = 0
        self.offset = 0
        """Records of the current epoch already taken."""
        self._order_epoch = -1
        self._order: list[int] = []

    def epoch_order(self, epoch: int) -> list[int]:
        """Record indices in the order epoch ``epoch`` visits them."""
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, count: int) -> list[PromptRecord]:
        """The next ``count`` records (crossing into the next epoch when this one runs out)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        taken: list[PromptRecord] = []
        while len(taken) < count:
            if self._order_epoch != self.epoch:
                self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
            end = min(len(self.records), self.offset + count - len(taken))
            taken.extend(self.records[index] for index in self._order[self.offset:end])
            self.offset = end
            if self.offset == len(self.records):
                self.epoch, self.offset = self.epoch + 1, 0
        return taken

    def next_batch(self) -> list[PromptRecord]:
        return self.take(self.batch_size)

    def __iter__(self) -> Iterator[list[PromptRecord]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "offset": self.offset, "seed": self.seed, "shuffle": self.shuffle,
            "num_records": len(self.records), "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``'s position; ValueError if it belongs to another dataset or order."""
        for key, mine in (("num_records", len(self.records)), ("fingerprint", self.fingerprint),
                          ("seed", self.seed), ("shuffle", self.shuffle)):
            if state.get(key) != mine:
                raise ValueError(
                    f"prompt sampler state does not match this sampler: {key} is {state.get(key)!r} in the "
                    f"checkpoint but {mine!r} here (different dataset or seed)"
                )
        epoch, offset = state.get("epoch"), state.get("offset")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(offset, int) and 0 <= offset < len(self.records)):
            raise ValueError(f"prompt sampler state has an invalid position epoch={epoch!r} offset={offset!r}")
        self.epoch, self.offset = epoch, offset
