"""The typed batches exchanged between rollout, experience making and the loss functions.

:class:`Rollout` is what generation and scoring produce; :func:`make_experience` turns it into an
:class:`Experience`, which is everything the actor and critic losses consume besides the current
model outputs. Both follow the package conventions: token-level tensors ``[B, T]`` over response
tokens, right-padded, with ``response_mask``; sequence-level tensors ``[B]``.

Neither class copies or validates tensors on construction; :func:`make_experience` validates a
Rollout (shapes, mask, finiteness) before using it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rollout:
    """Sampled responses with their scores and the log-probs / values computed at rollout time."""

    rewards: Tensor  # [B] raw sequence reward from the reward model / verifier
    response_mask: Tensor  # [B, T] 1 = response token, 0 = padding (right-padded)
    old_logprobs: Tensor  # [B, T] log pi_old(token): the policy that sampled the response
    ref_logprobs: Tensor | None = None  # [B, T] log pi_ref(token); None only if kl_mode == "none"
    values: Tensor | None = None  # [B, T] critic V(s_t) at rollout time; needed by "gae"
    group_index: Tensor | None = None  # [B] int64 prompt id; needed by group estimators / norm
    domain_ids: Tensor | None = None  # [B] int64 task-domain id; needed by "domain" normalisation
    rollout_logprobs: Tensor | None = None  # [B, T] the engine's sampling log-probs; needed by rollout_is

    @property
    def batch_size(self) -> int:
        return int(self.rewards.shape[0])


@dataclass(frozen=True)
class Experience:
    """Everything the losses need from a rollout, after shaping and advantage estimation."""

    response_mask: Tensor  # [B, T] bool, True = response token
    old_logprobs: Tensor  # [B, T] log pi_old(token), the PPO ratio's denominator
    advantages: Tensor  # [B, T] advantage per response token, 0 at padding
    token_rewards: Tensor  # [B, T] shaped score at the last token + KL penalty (for logging)
    sequence_scores: Tensor  # [B] reward after clip -> normalise -> baseline -> shrink
    raw_rewards: Tensor  # [B] the rollout's rewards, unshaped (for logging)
    ref_logprobs: Tensor | None = None  # [B, T] log pi_ref(token); for kl_mode == "loss"
    kl: Tensor | None = None  # [B, T] per-token KL(pi_old || pi_ref) estimate, 0 at padding
    returns: Tensor | None = None  # [B, T] critic targets A + V ("gae" only), 0 at padding
    old_values: Tensor | None = None  # [B, T] critic V at rollout time ("gae" only)
    group_index: Tensor | None = None  # [B] int64 prompt id, if the rollout had one
    rollout_logprobs: Tensor | None = None  # [B, T] log mu(token) of the engine that sampled it

    @property
    def batch_size(self) -> int:
        return int(self.response_mask.shape[0])

    def select(self, index: Tensor | slice) -> Experience:
        """The experience of the samples ``index`` selects along B (e.g. a micro-batch)."""
        return replace(self, **_map_tensors(self, lambda tensor: tensor[index]))

    def to(self, device: torch.device | str) -> Experience:
        """A copy with every tensor moved to ``device``."""
        return replace(self, **_map_tensors(self, lambda tensor: tensor.to(device)))


def _map_tensors(experience: Experience, function) -> dict[str, Tensor]:
    mapped = {}
    for field in fields(experience):
        value = getattr(experience, field.name)
        if isinstance(value, Tensor):
            mapped[field.name] = function(value)
    return mapped
