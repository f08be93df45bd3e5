"""Chat / SFT data: JSONL schema, tokenisation with the tokenizer's chat template, loss masks.

Schema, one JSON object per line (read with :func:`megatron_rlhf.data.jsonl.read_jsonl`, so a bad
line is reported as ``file:line: reason``):

* ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: at least
  one assistant message with non-empty content; every assistant message is trained on.
* ``{"prompt": str, "response": str}`` (optionally ``"system": str``): one user turn and one
  assistant turn.

Tokenisation (:func:`tokenize_chat`): the whole conversation is rendered once with the tokenizer's
chat template and tokenised once (``add_special_tokens=False``: the template writes BOS itself).
The characters of assistant turn ``i`` are those between the rendering of ``messages[:i]`` with
the generation prompt and the rendering of ``messages[:i + 1]``, so a turn includes what the
template closes it with (e.g. ``<|eos|>``): the model learns to stop. A token belongs to a turn
when its first character does. ``loss_mask[t] = 1`` marks token ``t`` as a training target
(predicted from position ``t - 1``), the convention of
:func:`megatron_rlhf.training.lm_loss.next_token_loss`.

Guarantees: the mask is 1 only on assistant-turn tokens (never on system/user text, role
headers, BOS or padding); sequences longer than ``max_length`` are cut on the right and counted
(``ChatBatch.num_truncated``); batches are right padded with the tokenizer's pad id.

Not guaranteed: templates whose rendering of a conversation prefix is not a string prefix of the
full rendering (e.g. templates that drop earlier "thinking" text) are refused with a ValueError,
not handled; a fast (Rust) tokenizer is required for the character offsets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_rlhf.data.jsonl import ParsedDataset, RecordError, read_jsonl, require_str

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    """system | user | assistant."""
    content: str


@dataclass(frozen=True)
class ChatExample:
    """One conversation to train on (every assistant turn is a target)."""

    messages: tuple[ChatMessage, ...]
    source: str = ""
    """Where it came from (``file:line`` for file data), used in error messages."""


def _message(raw: Any, index: int) -> ChatMessage:
    if not isinstance(raw, dict):
        raise RecordError(f"messages[{index}] must be an object, got {type(raw).__name__}")
    role = raw.get("role")
    if role not in CHAT_ROLES:
        raise RecordError(f"messages[{index}].role={role!r} (choose from {', '.join(CHAT_ROLES)})")
    content = raw.get("content")
    if not isinstance(content, str):
        raise RecordError(
            f"messages[{index}].content must be a string, got {type(content).__name__}"
        )
    return ChatMessage(role, content)


def parse_chat_record(record: Mapping[str, Any], source: str = "") -> ChatExample:
    """A :class:`ChatExample` from either schema; raises RecordError naming the bad field."""
    if "messages" in record:
        raw_messages = record["messages"]
        if not isinstance(raw_messages, list) or not raw_messages:
            raise RecordError("field 'messages' must be a non-empty list of {role, content}")
        messages = tuple(_message(raw, index) for index, raw in enumerate(raw_messages))
    elif "prompt" in record or "response" in record:
        messages = (
            ChatMessage("user", require_str(record, "prompt")),
            ChatMessage("assistant", require_str(record, "response")),
        )
        if "system" in record:
            messages = (ChatMessage("system", require_str(record, "system")), *messages)
    else:
        raise RecordError("expected a 'messages' list or 'prompt' and 'response' fields")
    if not any(m.role == "assistant" and m.content for m in messages):
        raise RecordError("no assistant message with non-empty content (nothing to train on)")
    return ChatExample(messages, source)


def read_chat_jsonl(path: str | Path, strict: bool = True) -> ParsedDataset[ChatExample]:
    """Read a chat/SFT JSONL file; each example's ``source`` is ``path:line``."""
    dataset = read_jsonl(path, parse_chat_record, strict=strict)
    examples = [
        ChatExample(example.messages, f"{dataset.path}:{line}")
        for example, line in zip(dataset.records, dataset.lines)
    ]
    return ParsedDataset(examples, dataset.lines, dataset.malformed, dataset.path)


def as_chat_examples(
    examples: Sequence[ChatExample | Mapping[str, Any]], where: str
) -> list[ChatExample]:
    """Accept ChatExamples or ``{"messages": ...}`` / ``{"prompt", "response"}`` dicts."""
    parsed = []
    for index, example in enumerate(examples):
        if isinstance(example, ChatExample):
            parsed.append(example)
            continue
        source = f"{where}[{index}]"
        try:
            parsed.append(parse_chat_record(example, source))
        except (RecordError, KeyError, TypeError) as error:
            raise ValueError(f"{source}: {error}") from error
    return parsed


# ----------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class TokenizedChat:
    token_ids: tuple[int, ...]
    """The rendered conversation, at most ``max_length`` tokens."""
    loss_mask: tuple[int, ...]
    """1 on assistant-turn tokens (targets), 0 elsewhere; same length as ``token_ids``."""
    truncated: bool
    """True when the rendering was longer than ``max_length`` and was cut."""

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


def _render(tokenizer: Any, messages: Sequence[ChatMessage], generation_prompt: bool) -> str:
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    if not isinstance(rendered, str):
        raise TypeError(f"chat template rendered a {type(rendered).__name__}, expected str")
    return rendered


def assistant_spans(tokenizer: Any, example: ChatExample) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template")
    full = _render(tokenizer, example.messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(example.messages):
        if message.role != "assistant":
            continue
        start = len(_render(tokenizer, example.messages[:index], generation_prompt=True))
        turn = _render(tokenizer, example.messages[: index + 1], generation_prompt=False)
        if not full.startswith(turn) or start > len(turn):
            raise ValueError(
                f"{example.source or 'example'}: the chat template's rendering of the first "
                f"{index + 1} messages is not a prefix of the whole conversation; cannot locate "
                "the assistant turn"
            )
        spans.append((start, len(turn)))
    return full, spans


def tokenize_chat(tokenizer: Any, example: ChatExample, max_length: int) -> TokenizedChat:
    """Token ids and assistant loss mask of ``example`` (see the module docstring)."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be >= 2")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; character offsets are "
            "needed to find the assistant tokens"
        )
    text, spans = assistant_spans(tokenizer, example)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    token_ids = list(encoded["input_ids"])
    mask = [
        int(any(start <= token_start < end for start, end in spans))
        for token_start, _ in encoded["offset_mapping"]
    ]
    truncated = len(token_ids) > max_length
    return TokenizedChat(tuple(token_ids[:max_length]), tuple(mask[:max_length]), truncated)


@dataclass(frozen=True)
class ChatBatch:
    """Right-padded tokenised conversations."""

    input_ids: torch.Tensor
    """[B, L] int64 token ids, right padded with ``pad_token_id``."""
    loss_mask: torch.Tensor
    """[B, L] float32, 1.0 on assistant tokens to predict, 0.0 on prompt text and padding."""
    sequence_lengths: torch.Tensor
    """[B] int64 tokens before the padding."""
    num_truncated: int
    """Conversations cut to ``max_length``."""

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def collate_chats(
    tokenized: Sequence[TokenizedChat], pad_token_id: int, length: int | None = None
) -> ChatBatch:
    """Right pad to ``length`` (default: the longest sequence)."""
    if not tokenized:
        raise ValueError("collate_chats needs at least one tokenized conversation")
    longest = max(len(chat.token_ids) for chat in tokenized)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest sequence ({longest})")
    input_ids = torch.full((len(tokenized), length), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros(len(tokenized), length, dtype=torch.float32)
    for row, chat in enumerate(tokenized):
        input_ids[row, : len(chat.token_ids)] = torch.tensor(chat.token_ids, dtype=torch.long)
        loss_mask[row, : len(chat.loss_mask)] = torch.tensor(chat.loss_mask, dtype=torch.float32)
    lengths = torch.tensor([len(chat.token_ids) for chat in tokenized], dtype=torch.long)
    truncated = sum(chat.truncated for chat in tokenized)
    return ChatBatch(input_ids, loss_mask, lengths, truncated)


def pad_token_id_of(tokenizer: Any) -> int:
    """The pad id, falling back to EOS; raises if the tokenizer has neither."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"tokenizer {type(tokenizer).__name__} defines neither a pad nor an eos token")


def tokenize_chat_batch(
    tokenizer: Any, examples: Sequence[ChatExample], max_length: int
) -> ChatBatch:
    """:func:`tokenize_chat` every example and :func:`collate_chats` them."""
    tokenized = [tokenize_chat(tokenizer, example, max_length) for example in examples]
    return collate_chats(tokenized, pad_token_id_of(tokenizer))
