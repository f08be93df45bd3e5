"""Exception types raised by :mod:`megatron_rlhf.algorithms`.

Every error a caller can cause (a bad config value, tensors whose shapes disagree, a NaN reward)
raises one of these with a message naming the offending value and where it came from. They
subclass :class:`ValueError`, so callers that only care about "bad input" can catch that.
"""

from __future__ import annotations

from megatron_rlhf.config.errors import UserError


class AlgorithmConfigError(UserError):
    """An :class:`~megatron_rlhf.algorithms.config.AlgorithmConfig` field (or a function argument
    that mirrors one) is outside its valid range, or fields contradict each other."""


class UnknownNameError(AlgorithmConfigError):
    """A name looked up in a registry (advantage estimator, reduction, KL estimator, ...) that is
    not registered. The message lists the registered names."""


class BatchShapeError(ValueError):
    """Tensors of one batch disagree on shape or dtype, or a ``response_mask`` breaks the
    conventions (2-D, values 0/1, right-padded)."""


class NonFiniteError(ValueError):
    """A tensor holds NaN or +-Inf where the function needs finite values (at response tokens,
    for token-level tensors). The message names the tensor and the first bad position."""
