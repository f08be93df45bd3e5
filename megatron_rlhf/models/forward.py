"""Forward passes through a pipelined model with Megatron-Core's own schedules.

:func:`forward_only` runs microbatches through every pipeline stage (no-pipelining schedule for
PP=1, 1F1B otherwise) and returns, on the last stage, whatever ``collect`` makes of each
microbatch's output; other stages get an empty list. Used for logit checks, reference/actor
log-probs and reward scoring.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def run_microbatch(stage_model: torch.nn.Module, microbatch: dict[str, torch.Tensor]) -> torch.Tensor:
    """This stage's output for a microbatch (``input_ids`` and optional ``position_ids`` /
    ``sequence_lengths``), as Megatron's schedules call it.

    Under context parallelism each CP rank runs its load-balanced part of the sequence
    (:mod:`megatron_rlhf.models.context_parallel`) and the last stage's per-token output is
    gathered back to the whole sequence, so callers see the same shapes as without CP. A length
    that sequence/context parallelism cannot split is right-padded and the output cut back
    (:mod:`megatron_rlhf.models.sequence_padding`).

    A microbatch with ``positions`` ``[b, R]`` (a log-prob pass's read positions) gets, from an
    ``lm``-role model's last stage, the logits at those positions only, ``[b, R, V / TP]``
    (:mod:`megatron_rlhf.models.logit_positions`; under context parallelism, read from the
    gathered logits). Other roles ignore them.

    A packed microbatch (``packed_seq_params``, :mod:`megatron_rlhf.models.packing`: one row
    ``[1, T]`` of several sequences) goes to the model as it is: its packer already padded the
    row's tail to the sequence multiple; context parallelism is refused."""
    from megatron.core import parallel_state

    from megatron_rlhf.models.sequence_padding import padded_length, run_padded, sequence_multiple

    multiple = sequence_multiple(stage_model.config)  # SP/CP split the sequence: pad it to fit
    if microbatch.get("packed_seq_params") is not None:
        return _run_packed(stage_model, microbatch, multiple)
    if microbatch["input_ids"].shape[1] != padded_length(microbatch["input_ids"].shape[1], multiple):
        return run_padded(lambda padded: run_microbatch(stage_model, padded), microbatch, multiple,
                          parallel_state.is_pipeline_last_stage())
    if parallel_state.get_context_parallel_world_size() > 1:
        return _run_context_parallel(stage_model, microbatch)
    return stage_model(
        microbatch["input_ids"],
        microbatch.get("position_ids"),
        sequence_lengths=microbatch.get("sequence_lengths"),
        logit_positions=microbatch.get("positions"),
    )


def _run_packed(stage_model: torch.nn.Module, microbatch: dict, multiple: int) -> torch.Tensor:
    from megatron.core import parallel_state

    length = microbatch["input_ids"].shape[1]
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError("packed sequences do not cover context parallelism; use context_parallel=1")
    if length % multiple:
        raise ValueError(f"a packed row of {length} tokens is not a multiple of {multiple} "
                         "(sequence parallelism): pack it with that multiple")
    return stage_model(microbatch["input_ids"], microbatch["position_ids"],
                       sequence_lengths=microbatch.get("sequence_lengths"),
                       packed_seq_params=microbatch["packed_seq_params"],
                       logit_positions=microbatch.get("positions"))


def _run_context_parallel(stage_model: torch.nn.Module, microbatch: dict[str, torch.Tensor]) -> torch.Tensor:
    from megatron.core import parallel_state

    from megatron_rlhf.models.context_parallel import gather_output, split_microbatch

    if getattr(stage_model, "role", None) == "reward" or microbatch.get("sequence_lengths") is not None:
        raise ValueError("context parallelism covers per-token roles (lm, value); use context_parallel=1 "
                         "for reward models")
    input_ids, position_ids, length = split_microbatch(
        microbatch, parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    )
    output = stage_model(input_ids, position_ids)
    if not parallel_state.is_pipeline_last_stage():
        return output  # activations travel to the next stage in CP layout
    output = gather_output(output, length, parallel_state.get_context_parallel_group())
    positions = microbatch.get("positions")
    if positions is not None and _role(stage_model) == "lm":  # the logits a log-prob pass reads
        from megatron_rlhf.models.logit_positions import rows_of

        output = output[rows_of(positions, False).to(output.device), positions.to(output.device)]
    return output


def _role(stage_model: torch.nn.Module) -> str | None:
    """The role of a (possibly DDP-wrapped) :class:`~megatron_rlhf.models.heads.RoleModel`."""
    while not hasattr(stage_model, "role") and isinstance(getattr(stage_model, "module", None), torch.nn.Module):
        stage_model = stage_model.module
    return getattr(stage_model, "role", None)


@torch.no_grad()
def forward_only(
    model: torch.nn.Module,
    microbatches: list[dict[str, torch.Tensor]],
    collect: Callable[[torch.Tensor, dict[str, torch.Tensor]], Any],
) -> list[Any]:
    """Run ``model`` on each microbatch; return ``collect(output, microbatch)`` per microbatch.

    Every microbatch holds ``input_ids`` ``[B, T]`` and optionally ``position_ids``,
    ``sequence_lengths`` and ``packed_seq_params``; all ranks must pass the same shapes. Under
    pipeline parallelism every microbatch has the same B and T (one activation shape per call);
    without it, shapes may differ (packed rows of different lengths).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rlhf.models.sequence_padding import schedule_seq_length

    if not microbatches:
        return []
    batch_size, seq_length = microbatches[0]["input_ids"].shape
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    for index, microbatch in enumerate(microbatches):
        if pipelined and tuple(microbatch["input_ids"].shape) != (batch_size, seq_length):
            raise ValueError(
                f"microbatch {index} has input_ids shape {tuple(microbatch['input_ids'].shape)}, "
                f"expected {(batch_size, seq_length)} like microbatch 0"
            )
    iterator = iter(microbatches)

    def forward_step(data_iterator, stage_model):
        microbatch = next(data_iterator)
        output = run_microbatch(stage_model, microbatch)

        def collect_output(output_tensor: torch.Tensor, non_loss_data: bool = False):
            return collect(output_tensor, microbatch)

        return output, collect_output

    was_training = model.training
    model.eval()
    try:
        collected = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterator,
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=schedule_seq_length(model.config, seq_length),
            micro_batch_size=batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    finally:
        model.train(was_training)
    return list(collected) if parallel_state.is_pipeline_last_stage() else []


def gather_vocab_parallel_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """All-gather ``[B, T, V/tp]`` logits over the TP group -> ``[B, T, vocab_size]``.

    Materialises the full vocabulary on every TP rank: for checks and tools, not for training
    (use :mod:`megatron_rlhf.models.logprobs` there).
    """
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if group.size() > 1:
        parts = [torch.empty_like(logits) for _ in range(group.size())]
        torch.distributed.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]
