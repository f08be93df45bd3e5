"""rollout/response_text.py: vLLM's text is reused only where it equals the decode."""

from __future__ import annotations

from megatron_rlhf.models.tiny import train_tiny_tokenizer
from megatron_rlhf.rollout.response_text import engine_text_reusable, response_text


def _tokenizer():
    return train_tiny_tokenizer(300, seed=0)


def test_a_whole_character_ending_reuses_the_engine_text():
    tokenizer = _tokenizer()
    ids = tokenizer.encode("abc de", add_special_tokens=False)
    special = frozenset(tokenizer.all_special_ids)
    assert response_text("ENGINE", ids, tokenizer, special, True) == "ENGINE"  # not decoded again


def test_held_back_partial_character_is_decoded():
    tokenizer = _tokenizer()
    ids = tokenizer.encode("ab", add_special_tokens=False) + tokenizer.encode("é", add_special_tokens=False)[:1]
    special = frozenset(tokenizer.all_special_ids)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.endswith("\ufffd")
    assert response_text("ab", ids, tokenizer, special, True) == decoded


def test_trailing_special_tokens_are_skipped_when_checking_the_end():
    tokenizer = _tokenizer()
    special = frozenset(tokenizer.all_special_ids)
    ids = tokenizer.encode("ab", add_special_tokens=False) + tokenizer.encode("é", add_special_tokens=False)[:1]
    ids = ids + [tokenizer.eos_token_id]
    assert response_text("ab", ids, tokenizer, special, True) == tokenizer.decode(ids, skip_special_tokens=True)
    assert response_text("x", [tokenizer.eos_token_id], tokenizer, special, True) == ""


def test_not_reusable_always_decodes():
    tokenizer = _tokenizer()
    ids = tokenizer.encode("abc de", add_special_tokens=False)
    special = frozenset(tokenizer.all_special_ids)
    assert response_text("abc", ids, tokenizer, special, False) == "abc de"
    assert not engine_text_reusable(tokenizer, ("stop",))
    assert engine_text_reusable(tokenizer, ())
