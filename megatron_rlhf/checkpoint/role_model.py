"""Build this rank's stage of a model for a role and fill it, in one call: :func:`load_role_model`.

Every place that needs a live Megatron model (the RL workers, SFT, reward-model training, the
learned reward sources, the checkpoint converters and verifier, the weight-sync check) calls this
one function, so the build (:func:`~megatron_rlhf.models.provider.build_stage_model`, heads by
``build.role``: ``lm``, ``value``, ``reward``, ``prm``), the layout check and vocabulary padding
(:func:`~megatron_rlhf.models.provider.validate_layout`) and the load are done the same way
everywhere. The weights come from one of two sources:

* :class:`HFWeights`: a Hugging Face directory, read through the declarative weight mapping
  (:func:`~megatron_rlhf.mapping.engine.load_hf_weights`); each rank reads only its shards.
* :class:`MegatronCheckpoint`: a Megatron distributed checkpoint saved by this package at any
  layout (:func:`~megatron_rlhf.checkpoint.dist_ckpt.load_model_checkpoint`).

Guarantees: Megatron's parallel state must already be initialised for ``parallel`` (the caller
owns process groups, seeds and rendezvous); every parameter of the stage is filled or the load
raises (:class:`~megatron_rlhf.mapping.engine.WeightMappingError`,
:class:`~megatron_rlhf.checkpoint.dist_ckpt.CheckpointError`) naming what is missing. The model
keeps the dtype ``build`` asks for and is moved to ``device`` before it is filled.

Not done here: reading the architecture from the source (callers hold it already, from an HF
config or a checkpoint's metadata) and checking that ``build.padded_vocab_size`` agrees with a
checkpoint's (the checkpoint load fails on the shape if it does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import torch

    from megatron_rlhf.config.parallel import ParallelConfig
    from megatron_rlhf.models.arch import ArchSpec
    from megatron_rlhf.models.heads import RoleModel
    from megatron_rlhf.models.provider import ModelBuildConfig


@dataclass(frozen=True)
class HFWeights:
    """Weights in a Hugging Face directory (safetensors + config.json)."""

    directory: str


@dataclass(frozen=True)
class MegatronCheckpoint:
    """Weights in a Megatron distributed checkpoint saved by :mod:`megatron_rlhf.checkpoint`."""

    directory: str


WeightSource = Union[HFWeights, MegatronCheckpoint]


@dataclass(frozen=True)
class LoadedRoleModel:
    """This rank's filled stage and what its callers need beside it."""

    model: RoleModel
    """This pipeline stage's :class:`~megatron_rlhf.models.heads.RoleModel` for ``build.role``."""
    padded_vocab: int
    """Rows of the embedding / LM head (the vocabulary padded for TP)."""
    left_initialised: tuple[str, ...] = ()
    """Megatron parameters left as initialised because their mapping rule is optional and the HF
    source lacks them (e.g. a fresh reward or value head); always empty for a checkpoint source."""


def load_role_model(
    arch: ArchSpec,
    parallel: ParallelConfig,
    build: ModelBuildConfig,
    source: WeightSource,
    device: torch.device | None = None,
) -> LoadedRoleModel:
    """Build this rank's stage of ``arch`` for ``build.role`` at ``parallel`` and fill it from ``source``."""
    from megatron_rlhf.models.provider import build_stage_model, validate_layout

    if not isinstance(source, (HFWeights, MegatronCheckpoint)):
        raise TypeError(f"source={source!r}: expected HFWeights or MegatronCheckpoint")
    padded_vocab = validate_layout(arch, parallel, build)
    model = build_stage_model(arch, parallel, build, device=device)
    if isinstance(source, HFWeights):
        from megatron_rlhf.checkpoint.hf_io import HFWeightReader
        from megatron_rlhf.mapping.engine import load_hf_weights

        skipped = load_hf_weights(model, HFWeightReader(source.directory), arch, build.role, padded_vocab)
        return LoadedRoleModel(model, padded_vocab, tuple(skipped))
    from megatron_rlhf.checkpoint.dist_ckpt import load_model_checkpoint

    load_model_checkpoint(model, source.directory)  # a MegatronCheckpoint
    return LoadedRoleModel(model, padded_vocab)
