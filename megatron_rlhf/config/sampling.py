"""Sampling settings of one generation request (a light value type).

Kept apart from :mod:`megatron_rlhf.rollout.engine` (the vLLM wrapper, which turns them into
vLLM's ``SamplingParams``) so that configs, the RL step, evaluation and reward code can name the
settings without importing torch or vLLM. Guarantees: an instance is validated on construction (a
bad value raises ``ValueError`` naming it); it does not check what a given engine supports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1
    """Responses per prompt."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1: no top-k."""
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    """Stop strings (the stop string is not part of the response)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response (in addition to EOS)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n={self.n} and max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature} >= 0 and top_p={self.top_p} in (0, 1]")
