"""Which requests skip the text of their log-prob tokens (:mod:`megatron_rlhf.rollout.logprob_text`);
the engine's own check of the numbers is in tests/integration/test_vllm_rollout_and_sync.py."""

from __future__ import annotations

from types import SimpleNamespace

from megatron_rlhf.rollout.logprob_text import LOGPROB_TEXT_ARG, apply_no_logprob_text, wants_logprob_text


def _request(extra_args):
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra_args))


def test_only_an_explicit_false_skips_the_text():
    assert not wants_logprob_text(_request({LOGPROB_TEXT_ARG: False}))
    for extra in (None, {}, {LOGPROB_TEXT_ARG: True}, {"other": False}, {LOGPROB_TEXT_ARG: 0}):
        assert wants_logprob_text(_request(extra))
    assert wants_logprob_text(SimpleNamespace(sampling_params=None))  # pooling requests


def test_the_patched_processor_gets_no_tokenizer_only_for_flagged_requests():
    from vllm.v1.engine.logprobs import LogprobsProcessor

    assert apply_no_logprob_text() and apply_no_logprob_text()  # idempotent
    tokenizer = object()
    params = dict(num_logprobs=0, prompt_logprobs=None, flat_logprobs=False)
    flagged = _request({LOGPROB_TEXT_ARG: False})
    flagged.sampling_params.__dict__.update(params)
    other = _request(None)
    other.sampling_params.__dict__.update(params)
    assert LogprobsProcessor.from_new_request(tokenizer, flagged).tokenizer is None
    assert LogprobsProcessor.from_new_request(tokenizer, other).tokenizer is tokenizer
