"""No text for the log-probs our rollouts ask vLLM for (the sampled token's log-prob, rank 0).

With ``logprobs`` requested, vLLM's front-end decodes every returned log-prob token to text
(``Logprob.decoded_token``: the token alone, then again with its context to check it), besides
the response text it already detokenises incrementally. Our rollouts read only the numbers. In a
cProfile of the tiny llama's ``generate`` (64 samples x 32 tokens, an engine in the caller's
process) that decoding was a third of the call's profiled time (``LogprobsProcessor
._update_sample_logprobs``: 0.76 s of 2.44 s over five calls, mostly the tokenizer's ``decode``).

:func:`apply_no_logprob_text` (run by our vLLM plugin in every process that loads it) makes vLLM's
``LogprobsProcessor`` skip that decoding, and only for requests whose ``SamplingParams.extra_args``
carry :data:`LOGPROB_TEXT_ARG` = False (:class:`~megatron_rlhf.rollout.engine.RolloutEngine` sets it):
their ``decoded_token`` is None, the log-probs, ranks and token ids are vLLM's own; the response
text (``CompletionOutput.text``) and stop strings are untouched (a separate detokeniser). Every
other request, and a vLLM whose processor lacks the hook, keeps vLLM's behaviour (logged).
Idempotent.
"""

from __future__ import annotations

import logging
from typing import Any

LOGPROB_TEXT_ARG = "megatron_rlhf_logprob_text"
"""``SamplingParams.extra_args`` key: False asks for log-probs without their tokens' text."""

log = logging.getLogger(__name__)


def wants_logprob_text(request: Any) -> bool:
    """False only for a request whose sampling parameters carry ``LOGPROB_TEXT_ARG: False``."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(LOGPROB_TEXT_ARG, True) is not False


def apply_no_logprob_text() -> bool:
    """Patch vLLM's ``LogprobsProcessor.from_new_request`` (see the module docstring); True if applied."""
    from vllm.v1.engine import logprobs

    processor = getattr(logprobs, "LogprobsProcessor", None)
    original = getattr(processor, "from_new_request", None)
    if original is None:
        log.info("vLLM's LogprobsProcessor has no from_new_request: log-prob tokens keep their text")
        return False
    if getattr(original, "_megatron_rlhf_no_text", False):
        return True
    build = original.__func__

    def from_new_request(cls: Any, tokenizer: Any, request: Any) -> Any:
        return build(cls, tokenizer if wants_logprob_text(request) else None, request)

    from_new_request._megatron_rlhf_no_text = True  # type: ignore[attr-defined]
    processor.from_new_request = classmethod(from_new_request)
    return True
