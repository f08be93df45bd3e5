"""Check that a Megatron checkpoint computes what its HF model computes.

:func:`verify_checkpoint` runs the checkpoint under its saved TP/PP/EP layout (local processes it
starts itself), runs the HF model with transformers on the same random token batch, and returns
the maximum absolute difference of the logits over every position and every vocabulary entry of
the HF vocabulary. Above the tolerance it raises :class:`VerificationFailed`. Both directories are
checked (metadata, config, safetensors headers, same vocabulary) before any process starts.

Tolerance: :data:`DEFAULT_TOLERANCE` = 1e-4 for float32 weights (what reordered fp32 reductions
give on these models); bf16/fp16 checkpoints are compared in float32 after loading and use
:data:`HALF_PRECISION_TOLERANCE`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_rlhf.checkpoint.convert import (
    ExportPlan,
    load_checkpoint_model,
    plan_checkpoint_load,
)
from megatron_rlhf.checkpoint.hf_io import HFWeightReader
from megatron_rlhf.models.arch import arch_spec_from_hf_config, load_hf_config
from megatron_rlhf.parallel.launch import Launcher

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
HALF_PRECISION_TOLERANCE = 5e-2


class VerificationFailed(RuntimeError):
    """The Megatron and HF logits differ by more than the tolerance."""

    def __init__(self, max_abs_diff: float, tolerance: float):
        super().__init__(f"max_abs_logit_diff={max_abs_diff:.3e} exceeds tolerance {tolerance:.1e}")
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


@dataclass(frozen=True)
class VerifyBatch:
    input_ids: torch.Tensor
    """[B, T] random token ids in the HF vocabulary."""


def random_batch(vocab_size: int, max_positions: int, seed: int, batch_size: int = 2,
                 seq_length: int = 32) -> VerifyBatch:
    generator = torch.Generator().manual_seed(seed)
    length = min(seq_length, max_positions)
    return VerifyBatch(torch.randint(0, vocab_size, (batch_size, length), generator=generator))


def _megatron_logits_worker(plan: ExportPlan, batch: VerifyBatch) -> torch.Tensor | None:
    from megatron.core import parallel_state

    from megatron_rlhf.models.forward import forward_only, gather_vocab_parallel_logits

    state, model = load_checkpoint_model(plan)
    microbatch = {"input_ids": batch.input_ids.to(state.device)}
    outputs = forward_only(
        model,
        [microbatch],
        lambda logits, _: gather_vocab_parallel_logits(logits.float(), plan.arch.vocab_size).cpu(),
    )
    if outputs and parallel_state.get_tensor_model_parallel_rank() == 0:
        return outputs[0]
    return None


def megatron_logits(plan: ExportPlan, batch: VerifyBatch, launcher: Launcher | None = None) -> torch.Tensor:
    """Full-vocabulary fp32 logits ``[B, T, V]`` of the checkpoint at the plan's layout, computed
    on ranks ``launcher`` runs (default: ``run_distributed``)."""
    from megatron_rlhf.parallel.launch import run_distributed

    results = (launcher or run_distributed)(_megatron_logits_worker, plan.world_size, plan, batch)
    # Every data-parallel replica's last stage computes them; take the first.
    return next(result for result in results if result is not None)


def hf_logits(hf_dir: str, batch: VerifyBatch) -> torch.Tensor:
    """fp32 logits of the HF model in ``hf_dir`` via transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch.input_ids).logits.float()


def check_hf_model_matches(hf_dir: str, plan: ExportPlan) -> None:
    """Fail before any work on an unreadable HF directory or one with another vocabulary."""
    source = str(Path(hf_dir) / "config.json")
    hf_arch = arch_spec_from_hf_config(load_hf_config(hf_dir), source=source)
    HFWeightReader(hf_dir)
    if hf_arch.vocab_size != plan.arch.vocab_size:
        raise ValueError(
            f"{source}: vocab_size={hf_arch.vocab_size}, but checkpoint {plan.ckpt_dir} has "
            f"vocab_size={plan.arch.vocab_size}; they are not the same model"
        )


def verify_checkpoint(
    hf_dir: str, ckpt_dir: str, tolerance: float | None = None, seed: int = 0,
    launcher: Launcher | None = None,
) -> float:
    """Max |logit difference| between the checkpoint and the HF model; raises above tolerance.

    ``launcher`` runs the Megatron side on the checkpoint's ranks (see :func:`megatron_logits`).
    """
    plan = plan_checkpoint_load(ckpt_dir)
    check_hf_model_matches(hf_dir, plan)
    if tolerance is None:
        half = plan.metadata.params_dtype != "float32"
        tolerance = HALF_PRECISION_TOLERANCE if half else DEFAULT_TOLERANCE
    batch = random_batch(plan.arch.vocab_size, plan.arch.max_position_embeddings, seed)
    log.info("running %s at its saved layout %s", ckpt_dir, plan.parallel.describe())
    reference = hf_logits(hf_dir, batch)
    candidate = megatron_logits(plan, batch, launcher)
    if candidate.shape != reference.shape:
        raise VerificationFailed(float("inf"), tolerance)
    max_abs_diff = float((candidate - reference).abs().max())
    if not max_abs_diff <= tolerance:  # also catches NaN
        raise VerificationFailed(max_abs_diff, tolerance)
    return max_abs_diff
