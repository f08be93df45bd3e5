"""Every difference between Megatron-Core releases that this package depends on, in one place.

Supported: megatron-core 0.16.x (the newest release for Python 3.11, used on CPU test machines)
and the newer releases GPU clusters run on Python 3.12. The rest of the package calls Megatron
through stable public APIs or through the functions here; nothing else branches on the version.

Strategy: keyword arguments that a release does not know are dropped only when they carry the
"off" value (so a new feature cannot be silently ignored); otherwise a clear error names the
argument and the installed version.
"""

from __future__ import annotations

import dataclasses
import inspect
from importlib import metadata
from typing import Any, Callable

MIN_MEGATRON_CORE = (0, 16)


class MegatronVersionError(RuntimeError):
    """The installed megatron-core cannot do what the configuration asks for."""


def megatron_core_version() -> tuple[int, ...]:
    """Installed megatron-core version as a tuple of ints, e.g. (0, 16, 1)."""
    try:
        raw = metadata.version("megatron-core")
    except metadata.PackageNotFoundError as error:
        raise MegatronVersionError(
            "megatron-core is not installed; install it with `pip install megatron-core` "
            "(0.16.x on Python 3.11, newer releases on Python >= 3.12)"
        ) from error
    numbers = []
    for part in raw.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    version = tuple(numbers)
    if version[:2] < MIN_MEGATRON_CORE:
        raise MegatronVersionError(
            f"megatron-core {raw} is too old; megatron-rlhf needs >= "
            f"{'.'.join(map(str, MIN_MEGATRON_CORE))}"
        )
    return version


def call_with_supported_kwargs(
    function: Callable[..., Any], off_values: dict[str, Any] | None = None, **kwargs: Any
) -> Any:
    """Call ``function`` dropping keyword arguments it does not accept.

    A keyword is dropped only if its value equals ``off_values[name]`` (feature off); an
    unsupported keyword with any other value raises :class:`MegatronVersionError`.
    """
    parameters = inspect.signature(function).parameters
    accepts_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    supported = {}
    for name, value in kwargs.items():
        if name in parameters or accepts_var_kwargs:
            supported[name] = value
        elif off_values is not None and name in off_values and off_values[name] == value:
            continue
        else:
            raise MegatronVersionError(
                f"{function.__module__}.{function.__qualname__} in megatron-core "
                f"{'.'.join(map(str, megatron_core_version()))} has no argument {name!r} "
                f"(asked for {name}={value!r})"
            )
    return function(**supported)


def dataclass_with_supported_fields(cls: type, off_values: dict[str, Any], **fields: Any) -> Any:
    """Instantiate a Megatron config dataclass, dropping fields this release lacks when off."""
    known = {field.name for field in dataclasses.fields(cls)}
    kept = {}
    for name, value in fields.items():
        if name in known:
            kept[name] = value
        elif name in off_values and off_values[name] == value:
            continue
        else:
            raise MegatronVersionError(
                f"{cls.__name__} in megatron-core {'.'.join(map(str, megatron_core_version()))} "
                f"has no field {name!r} (asked for {name}={value!r})"
            )
    return cls(**kept)


def global_layer_index(layer: Any) -> int:
    """0-based index of a TransformerLayer in the whole model (across pipeline stages)."""
    # ``layer_number`` is 1-based and global in every supported release.
    return int(layer.layer_number) - 1


def decoder_block_spec(config: Any, layer_spec: Any, final_norm: type) -> Any:
    """A ``TransformerBlock`` spec of this pipeline stage's layers (all ``layer_spec``) whose
    final norm is ``final_norm``: what Megatron builds from a bare layer spec, except for the norm
    (there it is the release's default, e.g. the torch norm that refuses sequence parallelism).

    The stage's layer count comes from ``get_num_layers_to_build`` (0.16: ``config``,
    ``vp_stage``, ``pp_rank``; the pipeline rank is read from Megatron's parallel state).
    """
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layers = get_num_layers_to_build(config)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=final_norm),
    )


def process_group_collection() -> Any:
    """The ProcessGroupCollection for the groups made by ``initialize_model_parallel``."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def gradient_buffers(ddp_model: Any) -> list[Any] | None:
    """The contiguous gradient buffers of a Megatron-Core DDP model, or None where unknown.

    Every trainable parameter's ``main_grad`` is a view into one of them (0.16.x: ``buffers`` and
    ``expert_parallel_buffers``, each a ``_ParamAndGradBuffer`` holding ``grad_data``); padding
    between parameters is zeroed with them. A release that lays them out otherwise returns None,
    and callers fall back to the per-parameter ``main_grad`` views.
    """
    dense, expert = getattr(ddp_model, "buffers", None), getattr(ddp_model, "expert_parallel_buffers", ())
    if not isinstance(dense, list) or not isinstance(expert, list):  # nn.Module.buffers is a method
        return None
    grads = [getattr(buffer, "grad_data", None) for buffer in dense + expert]
    if not grads or any(grad is None for grad in grads):
        return None
    return grads


def apply_release_fixes() -> list[str]:
    """Work around defects of specific megatron-core releases; returns what was fixed.

    - 0.16.x without Transformer Engine: ``moe_utils`` imports ``te_general_gemm`` only inside a
      ``try`` and then tests ``te_general_gemm is not None``, so every MoE router call raises
      NameError (GPU too). Defining the name as None selects the torch GEMM path it meant.
    """
    fixed = []
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return fixed
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        fixed.append("moe_utils.te_general_gemm")
    return fixed


def fake_rank_model_parallel(config: Any, world_size: int, rank: int):
    """Context manager: this process plays ``rank`` of a ``world_size`` job, without peers.

    torch's ``fake`` process-group backend (``torch.testing._internal.distributed.fake_pg``)
    answers every collective locally, so Megatron's ``initialize_model_parallel`` builds the real
    TP/PP/CP/EP groups of that rank; only NCCL/gloo twins are skipped (megatron-core 0.16 accepts
    ``create_gloo_process_groups=False``). Used to build a rank's model on the meta device at full
    size. Leaves no process group behind.
    """
    import contextlib

    import torch
    from megatron.core import parallel_state, tensor_parallel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    @contextlib.contextmanager
    def scope():
        from megatron_rlhf.parallel import cpu_support

        torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            if not torch.cuda.is_available():
                cpu_support.enable()
            call_with_supported_kwargs(
                parallel_state.initialize_model_parallel,
                off_values={"create_gloo_process_groups": False},
                tensor_model_parallel_size=config.tensor_parallel,
                pipeline_model_parallel_size=config.pipeline_parallel,
                context_parallel_size=config.context_parallel,
                expert_model_parallel_size=config.expert_parallel,
                expert_tensor_parallel_size=config.expert_tensor_parallel,
                create_gloo_process_groups=False,
            )
            tensor_parallel.model_parallel_cuda_manual_seed(1)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()

    return scope()
