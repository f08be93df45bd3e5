"""Run real Megatron-Core tensor, pipeline, data and expert parallelism on CPU over gloo.

Megatron-Core assumes CUDA in a few places: tensors allocated with ``device="cuda"`` or
``torch.cuda.current_device()``, ``torch.cuda.synchronize``/streams, ``tensor.cuda()`` calls and
the CUDA RNG tracker. :func:`enable` routes exactly those to the CPU, and only when CUDA is
absent; on a GPU machine it does nothing and returns ``False``.

How it works (two mechanisms, both scoped to a fixed list of Megatron modules):

1. *Module-scoped torch.* Each listed Megatron module gets its own ``torch`` global: a proxy that
   forwards every attribute to the real ``torch`` except that ``torch.cuda`` becomes a CPU stand-in
   (``current_device()`` is the CPU device, ``synchronize``/``empty_cache`` are no-ops, streams are
   null contexts) and tensor factories (``zeros``, ``empty``, ``tensor``, ...) map a CUDA ``device``
   argument to the CPU. Code outside those modules, including ours and torch itself, is untouched.
2. *Function-scoped tensor methods.* A few Megatron functions call ``tensor.cuda()`` or compare
   ``tensor.type()`` with ``'torch.cuda.FloatTensor'``; they are wrapped so that, while they run,
   ``Tensor.cuda`` returns the tensor itself and ``Tensor.type()`` names CPU tensors with their
   CUDA type name.

The CUDA RNG tracker is replaced by :class:`~megatron_rlhf.parallel.cpu_rng.CpuRNGStatesTracker`
(see that module), so dropout in tensor-parallel regions draws from per-TP-rank streams exactly
as on GPU.

Guarantees: after :func:`enable`, GPT models with the local layer spec (dense and MoE with the
alltoall/allgather dispatcher, with or without activation recomputation and sequence
parallelism), the no-pipelining and
1F1B pipeline schedules, Megatron DDP, the
(distributed) optimizer with gradient clipping, and distributed checkpointing (torch_dist) run on
CPU over gloo with several processes.

Not supported on CPU (each fails inside Megatron, not silently): Transformer Engine layer specs,
fused kernels (rope/bias-swiglu/masked-softmax fusions must stay off), CUDA graphs, fp16/bf16
mixed-precision optimizers with loss scaling, overlapping communication with compute (streams are
null), NCCL-only features (SHARP, NCCL user buffers, userbuffer TP overlap).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from typing import Any, Callable

import torch

from megatron_rlhf.parallel.cpu_rng import install_cpu_rng_tracker

# Megatron modules whose ``torch`` global is replaced by the CPU-routing proxy (the modules of
# the model, schedule, DDP, optimizer and checkpoint paths that name CUDA devices).
PATCHED_MODULES: tuple[str, ...] = (
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.timers",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.module",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.shared_experts",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
)

# (module, attribute path) of functions that call ``tensor.cuda()`` or check ``tensor.type()``.
TENSOR_CUDA_FUNCTIONS: tuple[tuple[str, str], ...] = (
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
    ),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_gather_rounds"),
    ("megatron.core.dist_checkpointing.exchange_utils", "exchange_loaded_tensors_broadcast"),
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._build_model_and_main_param_groups",
    ),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
)

_TENSOR_FACTORIES = frozenset(
    {
        "zeros",
        "ones",
        "empty",
        "full",
        "tensor",
        "arange",
        "rand",
        "randn",
        "randint",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "as_tensor",
        "empty_strided",
        "linspace",
    }
)

_ENABLED = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_factory(factory: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: work on CPU is synchronous, so waits are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _NullEvent()


class _CpuCuda(types.SimpleNamespace):
    """The ``torch.cuda`` seen by patched Megatron modules on a CPU machine."""

    def __init__(self) -> None:
        super().__init__()
        self.Stream = _NullStream
        self.Event = _NullEvent
        self.FloatTensor = torch.FloatTensor

    def __getattr__(self, name: str) -> Any:
        # Anything not routed explicitly keeps the real behaviour (and its real error).
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _NullStream()

    @staticmethod
    def default_stream(device: Any = None) -> _NullStream:
        return _NullStream()

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @staticmethod
    def nvtx_range_push(msg: str) -> None:
        pass

    @staticmethod
    def nvtx_range_pop() -> None:
        pass

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return 0


class _NullEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuTorch(types.ModuleType):
    """A ``torch`` look-alike for patched Megatron modules: CUDA requests land on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(torch, name)
        if name in _TENSOR_FACTORIES:
            return _cpu_factory(attribute)
        return attribute


@contextlib.contextmanager
def _tensor_methods_on_cpu():
    original_cuda = torch.Tensor.cuda
    original_type = torch.Tensor.type

    def cuda_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    def type_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(result, str) and result.startswith("torch."):
            if self.device.type == "cpu" and not result.startswith("torch.cuda."):
                return "torch.cuda." + result[len("torch.") :]
        return result

    torch.Tensor.cuda = cuda_on_cpu  # type: ignore[method-assign]
    torch.Tensor.type = type_on_cpu  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original_cuda  # type: ignore[method-assign]
        torch.Tensor.type = original_type  # type: ignore[method-assign]


def _wrap_tensor_methods(owner: Any, attribute: str) -> None:
    raw = owner.__dict__.get(attribute) if isinstance(owner, type) else None
    descriptor = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    function = raw.__func__ if descriptor is not None else getattr(owner, attribute)
    if getattr(function, "_megatron_rlhf_cpu", False):
        return

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _tensor_methods_on_cpu():
            return function(*args, **kwargs)

    wrapper._megatron_rlhf_cpu = True  # type: ignore[attr-defined]
    setattr(owner, attribute, descriptor(wrapper) if descriptor is not None else wrapper)
    if not isinstance(owner, type):
        # Modules that did ``from ... import function`` hold their own reference: rebind those.
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("megatron.") and (
                getattr(module, attribute, None) is function
            ):
                setattr(module, attribute, wrapper)


def _maybe_move_tensor_to_cpu_on_cpu(
    tensor: Any, as_numpy: bool = False, record_stream: bool = False
) -> Any:
    """Megatron's ``maybe_move_tensor_to_cpu`` for CPU tensors: honour ``as_numpy`` too.

    The original converts only CUDA tensors, so on CPU the MoE all-to-all split sizes stay
    tensors, which ``all_to_all_single`` rejects; on GPU they arrive as NumPy arrays.
    """
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _cuda_rng_state_on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Megatron's ``_get_cuda_rng_state`` on CPU: there is no CUDA generator (activation
    recomputation saves and restores the CPU generator and the tracker's streams separately)."""
    return torch.empty(0, dtype=torch.uint8)


def _set_cuda_rng_state_on_cpu(*args: Any, **kwargs: Any) -> None:
    """Megatron's ``_set_cuda_rng_state`` on CPU: nothing to restore (see above)."""


def _replace_function(module_name: str, attribute: str, replacement: Callable[..., Any]) -> None:
    """Replace a Megatron module-level function here and wherever it was imported by name."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    original = getattr(module, attribute, None)
    if original is None:
        return
    for other in list(sys.modules.values()):
        if getattr(other, "__name__", "").startswith("megatron.") and (
            getattr(other, attribute, None) is original
        ):
            setattr(other, attribute, replacement)


def enable() -> bool:
    """Route Megatron-Core's CUDA-only calls to the CPU when CUDA is absent.

    Idempotent. Returns True when the CPU routing is active, False on a CUDA machine (where it
    changes nothing). Must run before any Megatron model, optimizer or schedule is built.
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    cpu_torch = _CpuTorch()
    for module_name in PATCHED_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a module that this Megatron version does not have
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = cpu_torch
    for module_name, path in TENSOR_CUDA_FUNCTIONS:
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        *owners, attribute = path.split(".")
        for name in owners:
            owner = getattr(owner, name)
        if hasattr(owner, attribute):
            _wrap_tensor_methods(owner, attribute)
    import megatron.core.transformer.moe.token_dispatcher  # noqa: F401 - binds the name below

    _replace_function(
        "megatron.core.transformer.moe.moe_utils",
        "maybe_move_tensor_to_cpu",
        _maybe_move_tensor_to_cpu_on_cpu,
    )
    # activation recomputation (tensor_parallel.checkpoint) saves/restores the CUDA generator
    _replace_function("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _cuda_rng_state_on_cpu)
    _replace_function("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _set_cuda_rng_state_on_cpu)
    install_cpu_rng_tracker(_CpuTorch())
    _ENABLED = True
    return True


