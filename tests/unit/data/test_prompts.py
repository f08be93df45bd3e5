"""Prompt datasets: bad lines (malformed, empty, over-long) are reported with file:line and skipped,
the run proceeds on the valid ones; the sampler is deterministic and resumes mid-epoch exactly."""

from __future__ import annotations

import json
import logging
import re

import pytest

from megatron_rlhf.data.prompts import (
    PromptDatasetConfig,
    PromptRecord,
    PromptSampler,
    count_prompt_tokens,
    load_prompt_dataset,
)
from megatron_rlhf.models.tiny import train_tiny_tokenizer

LONG_PROMPT = "Can you help me sort a list of numbers? " * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(vocab_size=400, seed=0)


def _write(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _records(count: int, domain: str = "math") -> list[PromptRecord]:
    return [PromptRecord(f"{domain}-{i}", domain, f"prompt {i}", None) for i in range(count)]


def test_bad_lines_are_reported_with_file_and_line_and_the_rest_loads(tmp_path, tokenizer, caplog) -> None:
    path = _write(tmp_path / "prompts.jsonl", [
        json.dumps({"id": "a", "prompt": "What is 3 + 4?", "domain": "math", "ground_truth": "7"}),  # 1 ok
        '{"prompt": "broken", "domain": ',                                                            # 2 not JSON
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi"}], "domain": "general"}),          # 3 ok
        json.dumps({"prompt": "   ", "domain": "math"}),                                             # 4 empty
        json.dumps({"prompt": "no domain"}),                                                         # 5 malformed
        json.dumps({"prompt": LONG_PROMPT, "domain": "general"}),                                    # 6 too long
        "",                                                                                          # 7 blank: skipped silently
        json.dumps({"messages": [{"role": "user", "content": "x"},
                                 {"role": "assistant", "content": "y"}], "domain": "general"}),      # 8 malformed
        json.dumps({"messages": [{"role": "user", "content": ""}], "domain": "code"}),               # 9 empty
        json.dumps({"prompt": "Write add_1(x).", "domain": "code", "source": "mbpp"}),               # 10 ok
    ])
    config = PromptDatasetConfig(max_prompt_tokens=64)
    with caplog.at_level(logging.WARNING, logger="megatron_rlhf.data.prompts"):
        records, stats = load_prompt_dataset(path, config, tokenizer)

    assert [r.id for r in records] == ["a", "prompts:3", "prompts:10"]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3", f"{path}:10"]
    assert records[0].ground_truth == "7" and records[2].metadata == {"source": "mbpp"}
    assert records[1].rollout_input() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    # what the engine is given: chat messages under the chat template, else the raw rollout input
    assert records[0].engine_input(chat_template=True) == [{"role": "user", "content": "What is 3 + 4?"}]
    assert records[0].engine_input(chat_template=False) == "What is 3 + 4?"
    assert records[1].engine_input(chat_template=False) == records[1].rollout_input()
    assert [(bad.path, bad.line) for bad in stats.malformed] == [(path, 2), (path, 5), (path, 8)]
    assert "not valid JSON" in stats.malformed[0].reason and "domain" in stats.malformed[1].reason
    assert "last message" in stats.malformed[2].reason
    assert [bad.line for bad in stats.empty] == [4, 9]
    assert [bad.line for bad in stats.too_long] == [6] and "max_prompt_tokens=64" in stats.too_long[0].reason
    assert stats.loaded == 3 and stats.skipped == 6 and dict(stats.domains) == {"math": 1, "general": 1, "code": 1}
    logged = caplog.text
    for line in (2, 4, 5, 6, 8, 9):
        assert f"{path}:{line}:" in logged


def test_a_record_written_as_a_row_loads_back_equal(tmp_path, tokenizer) -> None:
    path = _write(tmp_path / "prompts.jsonl", [
        json.dumps({"id": "a", "prompt": "What is 3 + 4?", "domain": "math", "ground_truth": "7", "source": "gsm"}),
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                    "domain": "general"}),
    ])
    records, _ = load_prompt_dataset(path, PromptDatasetConfig(), tokenizer)
    again, _ = load_prompt_dataset(_write(tmp_path / "again.jsonl", [json.dumps(r.to_row()) for r in records]),
                                   PromptDatasetConfig(), tokenizer)
    def fields(record: PromptRecord) -> dict:
        return {**record.__dict__, "source": None}  # where a record was read differs

    assert [fields(r) for r in again] == [fields(r) for r in records]
    assert records[1].to_row()["id"] == "prompts:2"  # a generated id is written out, so it stays stable


def test_length_limit_counts_tokens_the_way_the_rollout_engine_encodes(tmp_path, tokenizer) -> None:
    record = PromptRecord("p", "math", "What is 3 + 4?", None)
    raw = len(tokenizer.encode("What is 3 + 4?", add_special_tokens=False))
    templated = len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True, tokenize=True, return_dict=False))
    assert count_prompt_tokens(record, tokenizer, chat_template=False) == raw
    assert count_prompt_tokens(record, tokenizer, chat_template=True) == templated == raw + 4  # bos, user, eos, assistant
    path = _write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "What is 3 + 4?", "domain": "math"}),
        json.dumps({"prompt": "What is 3?", "domain": "math"}),
    ])
    limit = PromptDatasetConfig(max_prompt_tokens=templated - 1)
    records, stats = load_prompt_dataset(path, limit, tokenizer)
    assert [r.prompt for r in records] == ["What is 3?"] and [bad.line for bad in stats.too_long] == [1]
    records, stats = load_prompt_dataset(path, PromptDatasetConfig(max_prompt_tokens=templated), tokenizer)
    assert len(records) == 2 and not stats.too_long


def test_a_file_without_any_valid_prompt_is_an_error_naming_it(tmp_path) -> None:
    path = _write(tmp_path / "bad.jsonl", ["[1, 2]", json.dumps({"prompt": "", "domain": "math"})])
    with pytest.raises(ValueError, match=re.escape(f"no valid prompt in {path}; {path}:1: expected a JSON object")):
        load_prompt_dataset(path)


def test_length_limit_without_a_tokenizer_is_a_config_error(tmp_path) -> None:
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "hi", "domain": "math"})])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_prompt_dataset(path, PromptDatasetConfig(max_prompt_tokens=8))
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        PromptDatasetConfig(max_prompt_tokens=0)


def test_default_domain_fills_lines_without_one(tmp_path) -> None:
    path = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "hi"}), json.dumps({"prompt": "x", "domain": "code"})])
    records, _ = load_prompt_dataset(path, PromptDatasetConfig(default_domain="general"))
    assert [r.domain for r in records] == ["general", "code"]


def test_each_epoch_visits_every_record_once_in_a_seeded_order() -> None:
    records = _records(10)
    sampler = PromptSampler(records, batch_size=5, seed=3)
    epochs = [[r.id for r in sampler.next_batch() + sampler.next_batch()] for _ in range(3)]
    assert all(sorted(epoch) == sorted(r.id for r in records) for epoch in epochs)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    again = PromptSampler(records, batch_size=5, seed=3)
    assert [[r.id for r in again.next_batch() + again.next_batch()] for _ in range(3)] == epochs
    other = PromptSampler(records, batch_size=5, seed=4)
    assert [r.id for r in other.next_batch() + other.next_batch()] != epochs[0]
    in_order = PromptSampler(records, batch_size=4, shuffle=False)
    assert [r.id for r in in_order.next_batch() + in_order.next_batch() + in_order.next_batch()] == [
        f"math-{i}" for i in [*range(10), 0, 1]
    ]


def test_resume_mid_epoch_gives_the_same_continuation() -> None:
    records = _records(7)
    uninterrupted = PromptSampler(records, batch_size=3, seed=11)
    for _ in range(2):  # 6 of 7 records: mid-epoch
        uninterrupted.next_batch()
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # survives a checkpoint file
    assert (state["epoch"], state["offset"]) == (0, 6)
    expected = [[r.id for r in uninterrupted.next_batch()] for _ in range(6)]  # crosses 2 epoch boundaries

    resumed = PromptSampler(records, batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert [[r.id for r in resumed.next_batch()] for _ in range(6)] == expected


def test_resume_refuses_another_dataset_or_seed() -> None:
    state = PromptSampler(_records(7), batch_size=3, seed=11).state_dict()
    with pytest.raises(ValueError, match="num_records"):
        PromptSampler(_records(8), batch_size=3, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        PromptSampler(_records(7, domain="code"), batch_size=3, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(_records(7), batch_size=3, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid position"):
        PromptSampler(_records(7), batch_size=3, seed=11).load_state_dict({**state, "offset": 7})
