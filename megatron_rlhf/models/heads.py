"""Model heads by role, chosen at construction.

Roles:

- ``lm``: the language-model head of Megatron's ``GPTModel`` (actor, reference, GenRM). Output:
  vocab-parallel logits ``[B, T, V_padded / TP]``, or ``[b, R, V_padded / TP]`` at the
  ``logit_positions`` a log-prob pass reads.
- ``value``: one scalar per token (PPO critic). Output ``[B, T]``.
- ``reward``: one scalar per sequence, read at the last non-padding token (outcome reward model,
  Bradley-Terry / BCE). Output ``[B]``; needs ``sequence_lengths``.
- ``prm``: one scalar (a logit) per token (process reward model); consumers read it at step
  boundaries with :func:`gather_at_positions`. Output ``[B, T]``.

The scalar heads apply the model's final RMSNorm themselves (the trunk is built without Megatron's
post-process stage) followed by a ``hidden -> 1`` projection. The projection is replicated across
tensor-parallel ranks; its inputs are identical on every TP rank, so its gradients are too.
"""

from __future__ import annotations

from typing import Any

import torch

ROLES = ("lm", "value", "reward", "prm")
SCALAR_ROLES = frozenset({"value", "reward", "prm"})


class ScalarHead(torch.nn.Module):
    """Final RMSNorm + linear projection to one scalar per token."""

    def __init__(self, hidden_size: int, norm_epsilon: float, init_std: float, sequence_parallel: bool):
        super().__init__()
        self.final_layernorm = torch.nn.RMSNorm(hidden_size, eps=norm_epsilon)
        self.score = torch.nn.Linear(hidden_size, 1, bias=False)
        torch.nn.init.normal_(self.score.weight, mean=0.0, std=init_std)
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[T, B, H]`` (Megatron's layout) -> per-token scalars ``[B, T]`` in fp32."""
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        normed = self.final_layernorm(hidden_states)
        scores = self.score(normed).squeeze(-1)  # [T, B]
        return scores.transpose(0, 1).float().contiguous()


def last_token_scores(token_scores: torch.Tensor, sequence_lengths: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` scores read at index ``sequence_lengths - 1`` of each row -> ``[B]``."""
    if sequence_lengths.dim() != 1 or sequence_lengths.shape[0] != token_scores.shape[0]:
        raise ValueError(
            f"sequence_lengths must have shape [{token_scores.shape[0]}], got "
            f"{tuple(sequence_lengths.shape)}"
        )
    if bool((sequence_lengths < 1).any()) or bool((sequence_lengths > token_scores.shape[1]).any()):
        raise ValueError(
            f"sequence_lengths must be in [1, {token_scores.shape[1]}], got "
            f"{sequence_lengths.tolist()}"
        )
    index = (sequence_lengths.to(torch.long) - 1).to(token_scores.device).unsqueeze(1)
    return token_scores.gather(1, index).squeeze(1)


def gather_at_positions(token_scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Scores at given token positions (e.g. PRM step boundaries).

    ``token_scores`` ``[B, T]``, ``positions`` ``[B, K]`` (long; entries < 0 are padding) ->
    ``[B, K]`` with 0.0 where the position is padding.
    """
    valid = positions >= 0
    safe = positions.clamp(min=0).to(torch.long)
    gathered = token_scores.gather(1, safe)
    return torch.where(valid, gathered, torch.zeros_like(gathered))


class RoleModel(torch.nn.Module):
    """A Megatron ``GPTModel`` trunk with the head of its role.

    The trunk is at ``.module`` (so Megatron's ``get_attr_wrapped_model`` finds it, as it does
    through DDP), the scalar head at ``.head`` (last pipeline stage only).
    """

    def __init__(self, role: str, trunk: Any, head: ScalarHead | None, post_process: bool,
                 transformer_impl: str = "local"):
        super().__init__()
        if transformer_impl not in ("local", "transformer_engine"):
            raise ValueError(f"transformer_impl={transformer_impl!r} must be resolved (local or transformer_engine)")
        if role not in ROLES:
            raise ValueError(f"role={role!r} (choose from {ROLES})")
        if (head is not None) != (role in SCALAR_ROLES and post_process):
            raise ValueError(f"role {role!r} on this stage needs head={role in SCALAR_ROLES}")
        self.role = role
        self.module = trunk
        self.head = head
        # Not named pre_process/post_process: Megatron's get_attr_wrapped_model looks those up
        # to find the GPTModel itself (e.g. for tied-embedding gradients), which is .module.
        self.is_last_stage = post_process
        self.config = trunk.config
        self.transformer_impl = transformer_impl
        """The layer spec the trunk was built with (resolved once by the provider): load, export,
        conversion and weight sync read parameter names through it."""

    def set_input_tensor(self, input_tensor: Any) -> None:
        """Receive the previous pipeline stage's activations (called by Megatron's schedules)."""
        self.module.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        sequence_lengths: torch.Tensor | None = None,
        packed_seq_params: Any = None,
        logit_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Role output on the last stage (see module docstring); activations elsewhere.

        ``logit_positions`` (``[b, R]``, ``lm`` role only, ignored by the others): the output layer
        runs at those positions only and the logits are ``[b, R, V / TP]``
        (:mod:`megatron_rlhf.models.logit_positions`; into the packed row when packed).

        ``input_ids`` ``[B, T]``, right-padded; attention is causal, so padding after a
        sequence never changes the outputs of its real tokens. Packed (``packed_seq_params``, THD:
        ``input_ids [1, T]`` holding several sequences, ``position_ids`` restarting per sequence),
        per-token outputs are ``[1, T]`` and the reward head reads ``[b]`` scores at
        ``sequence_lengths``, then each sequence's end in the row.
        """
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.unsqueeze(0).expand_as(input_ids)
        if logit_positions is not None and self.role == "lm" and self.is_last_stage:
            from megatron_rlhf.models.logit_positions import logits_at, rows_of

            with logits_at(self.module, logit_positions, rows_of(logit_positions, packed_seq_params is not None)):
                return self.module(input_ids, position_ids, None, packed_seq_params=packed_seq_params)
        output = self.module(
            input_ids, position_ids, None, packed_seq_params=packed_seq_params
        )
        if not self.is_last_stage or self.head is None:
            return output
        token_scores = self.head(output)
        if self.role == "reward":
            if sequence_lengths is None:
                raise ValueError("the reward head needs sequence_lengths to find the last token")
            if packed_seq_params is not None:  # one packed row serves every sequence in it
                token_scores = token_scores.expand(sequence_lengths.shape[0], -1)
            return last_token_scores(token_scores, sequence_lengths)
        return token_scores

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """Megatron distributed-checkpoint state: the trunk's, plus the replicated head."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.module.sharded_state_dict(f"{prefix}module.", sharded_offsets, metadata)
        if self.head is not None:
            head_state = {
                f"{prefix}head.{name}": tensor
                for name, tensor in self.head.state_dict(keep_vars=True).items()
            }
            state.update(make_sharded_tensors_for_checkpoint(head_state, "", {}, sharded_offsets))
        return state
