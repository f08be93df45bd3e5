"""Response text for the reward phase: vLLM's own detokenised text where it is provably what
``tokenizer.decode(ids, skip_special_tokens=True)`` gives, a decode in the engine's process
otherwise, so the controller never decodes.

vLLM (0.32, ``skip_special_tokens=True``) detokenises incrementally and differs from a whole
decode in exactly these cases, measured on the tiny byte-level tokenizers
(``tests/integration/test_vllm_rollout_and_sync.py``):

- a response whose bytes end inside a UTF-8 character: vLLM holds the incomplete bytes back and
  never emits them, the decode ends with U+FFFD;
- stop strings: vLLM cuts the text before the stop string, while the token ids (what is trained
  on, and what rewards saw before) hold the whole last token;
- a tokenizer that cleans up tokenization spaces on decode (vLLM does not).

The decode is taken as right (it is the text of the tokens the trainer trains on), so in those
cases :func:`response_text` decodes; elsewhere it returns vLLM's text unchanged.
Guarantee: the result equals ``tokenizer.decode(token_ids, skip_special_tokens=True)``.
"""

from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT_CHARACTER = "\ufffd"


def engine_text_reusable(tokenizer: Any, stop_strings: Sequence[str]) -> bool:
    """Whether vLLM's text can be reused at all for this tokenizer and these sampling settings."""
    return not stop_strings and not getattr(tokenizer, "clean_up_tokenization_spaces", False)


def response_text(engine_text: str, token_ids: Sequence[int], tokenizer: Any, special_ids: frozenset[int],
                  reusable: bool) -> str:
    """``tokenizer.decode(token_ids, skip_special_tokens=True)``, without decoding when vLLM's
    ``engine_text`` is that already: ``reusable`` (:func:`engine_text_reusable`) and the last
    non-special token decodes on its own to text ending on a whole character (so no bytes were
    held back at the end)."""
    if reusable:
        last = next((token for token in reversed(token_ids) if token not in special_ids), None)
        if last is None:
            return ""
        if not tokenizer.decode([last], skip_special_tokens=True).endswith(REPLACEMENT_CHARACTER):
            return engine_text
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)
