"""A batch's response texts: the producer's when given, the tokenizer's decode otherwise; grouped
by the caller's prompt index, with an empty group for a dropped prompt."""

from __future__ import annotations

import torch

from megatron_rlhf.models.tiny import train_tiny_tokenizer
from megatron_rlhf.types import RolloutBatch


def _batch(tokenizer, responses: list[str], prompt_index: list[int], texts: list[str] | None) -> RolloutBatch:
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in responses]
    width = max(len(row) for row in ids)
    response_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width)
    for row, tokens in enumerate(ids):
        response_ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return RolloutBatch(prompt_ids=torch.ones(len(ids), 1, dtype=torch.long), prompt_lengths=torch.ones(len(ids)),
                        response_ids=response_ids, response_mask=mask, sampling_logprobs=torch.zeros(len(ids), width),
                        finish_reasons=["stop"] * len(ids), group_index=torch.tensor(prompt_index),
                        prompt_index=torch.tensor(prompt_index), pad_token_id=0, response_texts=texts)


def test_texts_decode_without_producer_texts_and_group_by_prompt():
    tokenizer = train_tiny_tokenizer(300, seed=0)
    responses = ["The answer is 7.", "It is 12", "no idea"]
    decoded = _batch(tokenizer, responses, [0, 0, 2], None)
    assert decoded.texts(tokenizer) == [tokenizer.decode(tokenizer.encode(t, add_special_tokens=False),
                                                         skip_special_tokens=True) for t in responses]
    grouped = decoded.texts_by_prompt(tokenizer, 3)
    assert grouped[0] == decoded.texts(tokenizer)[:2] and grouped[1] == [] and grouped[2] == decoded.texts(tokenizer)[2:]
    given = _batch(tokenizer, responses, [1, 1, 0], ["a", "b", "c"])
    assert given.texts(tokenizer) == ["a", "b", "c"]  # the producer's text is used as given
    assert given.texts_by_prompt(tokenizer, 2) == [["c"], ["a", "b"]]
