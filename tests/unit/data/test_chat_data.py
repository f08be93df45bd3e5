"""Chat/SFT data: schema parsing with file:line errors, chat-template tokenisation, loss masks.

Uses the real tiny byte-level BPE tokenizer and its chat template (``<|bos|>`` then
``<|role|>content<|eos|>`` per message). The loss mask is checked by decoding exactly the masked
tokens, and by checking that no system/user text, role header, BOS or padding is ever a target.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_rlhf.data.chat import (
    ChatExample,
    ChatMessage,
    as_chat_examples,
    collate_chats,
    parse_chat_record,
    read_chat_jsonl,
    tokenize_chat,
    tokenize_chat_batch,
)
from megatron_rlhf.data.jsonl import DatasetError
from megatron_rlhf.models.tiny import ASSISTANT_TOKEN, EOS_TOKEN, train_tiny_tokenizer

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Answer with one number."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "The answer is 42."},
        {"role": "user", "content": "And 5 + 5?"},
        {"role": "assistant", "content": "10"},
    ]
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(300, seed=0)


def _targets(tokenizer, chat) -> str:
    return tokenizer.decode([t for t, m in zip(chat.token_ids, chat.loss_mask) if m])


def test_tiny_tokenizer_has_a_chat_template(tokenizer):
    assert tokenizer.chat_template is not None
    assert tokenizer.is_fast


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    chat = tokenize_chat(tokenizer, parse_chat_record(MULTI_TURN), max_length=256)
    assert _targets(tokenizer, chat) == f"The answer is 42.{EOS_TOKEN}10{EOS_TOKEN}"
    assert not chat.truncated
    assert len(chat.token_ids) == len(chat.loss_mask)
    # Everything the model is NOT trained to produce: BOS, system/user text, role headers.
    prompt_only = tokenizer.decode([t for t, m in zip(chat.token_ids, chat.loss_mask) if not m])
    assert "What is 12 + 30?" in prompt_only and "Answer with one number." in prompt_only
    assert prompt_only.count(ASSISTANT_TOKEN) == 2
    assert chat.token_ids == tuple(
        tokenizer(tokenizer.apply_chat_template(MULTI_TURN["messages"], tokenize=False),
                  add_special_tokens=False)["input_ids"]
    )


def test_assistant_header_token_is_never_a_target(tokenizer):
    chat = tokenize_chat(tokenizer, parse_chat_record(MULTI_TURN), max_length=256)
    header = tokenizer.convert_tokens_to_ids(ASSISTANT_TOKEN)
    bos = tokenizer.bos_token_id
    for token, masked in zip(chat.token_ids, chat.loss_mask):
        if token in (header, bos):
            assert masked == 0


def test_prompt_response_schema_equals_the_messages_form(tokenizer):
    short = {"system": "Be brief.", "prompt": "Say hi.", "response": "Hi!"}
    long_form = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi!"},
        ]
    }
    a = tokenize_chat(tokenizer, parse_chat_record(short), 64)
    b = tokenize_chat(tokenizer, parse_chat_record(long_form), 64)
    assert a == b
    assert _targets(tokenizer, a) == f"Hi!{EOS_TOKEN}"


def test_truncation_is_counted_and_batches_are_right_padded(tokenizer):
    examples = [
        parse_chat_record({"prompt": "Count.", "response": " ".join(["one two three"] * 20)}),
        parse_chat_record({"prompt": "Hi", "response": "Hello"}),
    ]
    batch = tokenize_chat_batch(tokenizer, examples, max_length=24)
    assert batch.num_truncated == 1
    assert batch.input_ids.shape == (2, 24)
    assert batch.sequence_lengths.tolist()[0] == 24
    short = int(batch.sequence_lengths[1])
    assert short < 24
    assert (batch.input_ids[1, short:] == tokenizer.pad_token_id).all()
    assert (batch.loss_mask[1, short:] == 0).all()
    assert batch.loss_mask.dtype == torch.float32
    assert batch.num_loss_tokens == int(batch.loss_mask.sum())
    assert batch.loss_mask[0].sum() > 0  # the cut response still has targets


def test_a_prompt_longer_than_max_length_leaves_no_targets(tokenizer):
    example = parse_chat_record({"prompt": "word " * 100, "response": "ok"})
    chat = tokenize_chat(tokenizer, example, max_length=16)
    assert chat.truncated and chat.num_loss_tokens == 0


def test_collate_refuses_a_length_shorter_than_the_longest(tokenizer):
    chat = tokenize_chat(tokenizer, parse_chat_record({"prompt": "a b c", "response": "d e f"}), 64)
    with pytest.raises(ValueError, match="shorter than the longest"):
        collate_chats([chat], pad_token_id=2, length=3)


def test_malformed_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [
        json.dumps(MULTI_TURN),
        "{not json",
        json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"prompt": "no response"}),
        json.dumps({"messages": [{"role": "assistant", "content": 7}]}),
        "",
        json.dumps([1, 2]),
        json.dumps({"prompt": "fine", "response": "yes"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as raised:
        read_chat_jsonl(path)
    message = str(raised.value)
    for line, reason in [
        (2, "not valid JSON"),
        (3, "role='robot'"),
        (4, "no assistant message"),
        (5, "missing field 'response'"),
        (6, "content must be a string"),
        (8, "expected a JSON object"),
    ]:
        assert f"{path}:{line}: " in message and reason in message, (line, reason, message)
    assert f"{path}:1:" not in message and f"{path}:9:" not in message

    lenient = read_chat_jsonl(path, strict=False)
    assert [example.source for example in lenient.records] == [f"{path}:1", f"{path}:9"]
    assert len(lenient.malformed) == 6


def test_in_memory_examples_name_their_index():
    given = ChatExample((ChatMessage("assistant", "x"),))
    parsed = as_chat_examples([{"prompt": "a", "response": "b"}, given], "ex")
    assert parsed[1] is given
    assert parsed[0].source == "ex[0]"
    with pytest.raises(ValueError, match=r"ex\[1\]: .*no assistant message"):
        as_chat_examples([MULTI_TURN, {"messages": [{"role": "user", "content": "q"}]}], "ex")


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    """A template whose rendering of a prefix is not a prefix of the whole (here: it renders the
    last assistant turn differently) cannot locate the assistant tokens: a clear error."""
    import copy

    odd = copy.deepcopy(tokenizer)
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}[final]{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    example = parse_chat_record(MULTI_TURN)
    with pytest.raises(ValueError, match="not a prefix"):
        tokenize_chat(odd, example, 256)
