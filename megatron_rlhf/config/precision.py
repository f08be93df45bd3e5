"""Numeric precision of training and generation: fp32, bf16 mixed precision, or fp8 through
Transformer Engine.

One :class:`PrecisionConfig` is used by every trainer and by the rollout engine:

- ``fp32``: fp32 weights, gradients and optimizer state (the CPU reference).
- ``bf16``: Megatron mixed precision: bf16 model weights and activations; Megatron's optimizer
  keeps fp32 main weights, fp32 main gradients (``grad_reduce_in_fp32``) and fp32 Adam moments.
- ``fp8``: the ``bf16`` setup plus Transformer Engine fp8 GEMMs, with a scaling ``fp8_recipe``
  (delayed, tensorwise, blockwise, mxfp8), an ``fp8_format`` (e4m3 everywhere, or hybrid: e4m3
  forward, e5m2 gradients), optionally the first/last transformer layers kept in bf16 and
  optionally the weights stored in fp8 (``fp8_params``).

:func:`transformer_config_fields` maps the config onto Megatron ``TransformerConfig`` keyword
arguments (pure); :func:`validate_precision_environment` checks, before any process starts, that
this machine can run it (fp8 needs Transformer Engine and a GPU whose compute capability runs the
recipe) and raises :class:`PrecisionError` naming the setting.

Guarantees: importing this module imports neither torch nor Transformer Engine; detection probes
(:func:`transformer_engine_installed`, :func:`detect_gpu_capability`) do so only when called.
Not guaranteed: that a recipe accepted here is fast; that the engine (vLLM) generates in fp8 (it
generates in bf16 whenever training is bf16 or fp8, see :func:`engine_dtype`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from megatron_rlhf.config.errors import ConfigError

MODES = ("fp32", "bf16", "fp8")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_FORMATS = ("e4m3", "hybrid")
AMAX_ALGOS = ("max", "most_recent")

# Lowest CUDA compute capability that runs each recipe (Transformer Engine's own checks):
# fp8 tensor cores arrive with Ada (8.9) / Hopper (9.0); 1x128 block scaling needs Hopper;
# MX (32-element block) scaling needs Blackwell (10.0).
RECIPE_MIN_CAPABILITY: dict[str, tuple[int, int]] = {
    "delayed": (8, 9),
    "tensorwise": (8, 9),
    "blockwise": (9, 0),
    "mxfp8": (10, 0),
}
RECIPE_GPU_NAMES = {"delayed": "Ada/Hopper", "tensorwise": "Ada/Hopper", "blockwise": "Hopper", "mxfp8": "Blackwell"}
BF16_MIN_CAPABILITY = (8, 0)  # Ampere


class PrecisionError(ConfigError):
    """A precision setting this configuration or this machine cannot run."""


@dataclass(frozen=True)
class PrecisionConfig:
    mode: str = "fp32"
    """fp32 | bf16 | fp8. bf16: Megatron mixed precision (bf16 weights, fp32 main weights,
    gradients and optimizer state). fp8: bf16 plus Transformer Engine fp8 GEMMs (GPU only)."""

    fp8_recipe: str = "delayed"
    """fp8 only: scaling recipe. delayed (amax history, Ada/Hopper+), tensorwise (current per-tensor
    scaling, Ada/Hopper+), blockwise (1x128/128x128 blocks, Hopper+), mxfp8 (MX 32-element
    blocks, Blackwell+)."""

    fp8_format: str = "hybrid"
    """fp8 only: e4m3 (forward and backward) or hybrid (e4m3 forward, e5m2 gradients)."""

    first_last_layers_bf16: bool = False
    """fp8 only: keep the first ``bf16_layers_at_start`` and last ``bf16_layers_at_end``
    transformer layers in bf16 (not supported by the delayed recipe)."""

    bf16_layers_at_start: int = 1
    """Layers kept in bf16 at the start of the model when first_last_layers_bf16. >= 0."""

    bf16_layers_at_end: int = 1
    """Layers kept in bf16 at the end of the model when first_last_layers_bf16. >= 0."""

    fp8_params: bool = False
    """fp8 only: store the GEMM weights in fp8 (saves memory; the optimizer keeps fp32 main
    weights)."""

    fp8_amax_history_len: int = 1024
    """fp8 delayed recipe: steps of amax history kept per tensor. >= 1."""

    fp8_amax_compute_algo: str = "max"
    """fp8 delayed recipe: max (over the history) or most_recent."""

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        _choice("fp8_format", self.fp8_format, FP8_FORMATS)
        _choice("fp8_amax_compute_algo", self.fp8_amax_compute_algo, AMAX_ALGOS)
        for name in ("bf16_layers_at_start", "bf16_layers_at_end"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PrecisionError(f"precision.{name}={value!r} must be an integer >= 0")
        if self.fp8_amax_history_len < 1:
            raise PrecisionError(
                f"precision.fp8_amax_history_len={self.fp8_amax_history_len} must be >= 1"
            )
        if self.mode != "fp8":
            for name in ("first_last_layers_bf16", "fp8_params"):
                if getattr(self, name):
                    raise PrecisionError(
                        f"precision.{name}=true needs precision.mode=fp8 (mode is {self.mode!r})"
                    )
        if self.mode == "fp8" and self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            raise PrecisionError(
                "precision.first_last_layers_bf16=true is not supported with "
                "precision.fp8_recipe='delayed' (Megatron); choose tensorwise, blockwise or mxfp8"
            )

    @property
    def params_dtype(self) -> str:
        """Model weight dtype name (provider.DTYPES key): float32 for fp32, else bfloat16."""
        return "float32" if self.mode == "fp32" else "bfloat16"

    @property
    def uses_transformer_engine(self) -> bool:
        """True when this precision needs the Transformer Engine layer spec (fp8)."""
        return self.mode == "fp8"

    def describe(self) -> str:
        if self.mode != "fp8":
            return self.mode
        extra = "+fp8-params" if self.fp8_params else ""
        ends = (
            f"+bf16-ends({self.bf16_layers_at_start},{self.bf16_layers_at_end})"
            if self.first_last_layers_bf16
            else ""
        )
        return f"fp8[{self.fp8_recipe},{self.fp8_format}]{ends}{extra}"


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PrecisionError(f"precision.{name}={value!r} (choose from {', '.join(choices)})")


def transformer_config_fields(precision: PrecisionConfig) -> dict[str, object]:
    """Megatron ``TransformerConfig`` keyword arguments for ``precision`` (pure).

    Dtypes are returned as names (``"float32"``/``"bfloat16"``) for ``params_dtype`` and
    ``pipeline_dtype``, so that this function needs no torch; the provider turns them into
    ``torch.dtype`` (:func:`torch_dtype_fields`).
    """
    half = precision.mode != "fp32"
    fields: dict[str, object] = {
        "params_dtype": precision.params_dtype,
        "pipeline_dtype": precision.params_dtype,
        "bf16": half,
        "fp16": False,
        "fp8": None,
        "fp8_recipe": None,
        "fp8_param": False,
        "first_last_layers_bf16": False,
    }
    if precision.mode == "fp8":
        fields.update(
            fp8=precision.fp8_format,
            fp8_recipe=precision.fp8_recipe,
            fp8_param=precision.fp8_params,
            fp8_margin=0,
            fp8_interval=1,
            fp8_wgrad=True,
            first_last_layers_bf16=precision.first_last_layers_bf16,
        )
        if precision.first_last_layers_bf16:
            fields.update(
                num_layers_at_start_in_bf16=precision.bf16_layers_at_start,
                num_layers_at_end_in_bf16=precision.bf16_layers_at_end,
            )
        if precision.fp8_recipe == "delayed":
            fields.update(
                fp8_amax_history_len=precision.fp8_amax_history_len,
                fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
            )
    return fields


def torch_dtype_fields(fields: dict[str, object]) -> dict[str, object]:
    """``fields`` with dtype names turned into ``torch.dtype`` (imports torch)."""
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    return {
        key: names[value] if key in ("params_dtype", "pipeline_dtype") else value
        for key, value in fields.items()
    }


def engine_dtype(precision: PrecisionConfig) -> str:
    """dtype the rollout engine generates in: float32 for fp32 training, else bfloat16."""
    return precision.params_dtype


def transformer_engine_installed() -> bool:
    """Whether Transformer Engine's PyTorch package can be imported here (no import done)."""
    return importlib.util.find_spec("transformer_engine") is not None


def detect_gpu_capability() -> tuple[int, int] | None:
    """CUDA compute capability (major, minor) of GPU 0 visible here, or None without a GPU.

    Uses nvidia-ml-py when installed (no CUDA context is created), else torch.cuda.
    """
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                if pynvml.nvmlDeviceGetCount() == 0:
                    return None
                handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                return int(major), int(minor)
            finally:
                pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return int(major), int(minor)


def validate_precision_environment(
    precision: PrecisionConfig,
    *,
    te_installed: bool | None = None,
    gpu_capability: tuple[int, int] | None | str = "detect",
    where: str = "precision",
) -> None:
    """Raise :class:`PrecisionError` if this machine cannot run ``precision``.

    ``te_installed`` / ``gpu_capability`` default to what is detected here; pass them to check
    for another machine. ``where`` names the config section in messages (e.g. a file and key).
    fp32 runs everywhere; bf16 runs on CPU and on Ampere+ GPUs; fp8 needs Transformer Engine and
    a GPU of the recipe's generation.
    """
    if precision.mode == "fp32":
        return
    capability = detect_gpu_capability() if gpu_capability == "detect" else gpu_capability
    assert capability is None or isinstance(capability, tuple)
    if precision.mode == "bf16":
        if capability is not None and capability < BF16_MIN_CAPABILITY:
            raise PrecisionError(
                f"{where}.mode='bf16' needs an Ampere or newer GPU (compute capability >= 8.0); "
                f"this GPU is {capability[0]}.{capability[1]}. Use mode: fp32"
            )
        return
    installed = transformer_engine_installed() if te_installed is None else te_installed
    if not installed:
        raise PrecisionError(
            f"{where}.mode='fp8' needs Transformer Engine (transformer_engine), which is not "
            "installed here; install it on a GPU machine or use mode: bf16"
        )
    if capability is None:
        raise PrecisionError(
            f"{where}.mode='fp8' needs a CUDA GPU; none is visible here. Use mode: bf16 or fp32"
        )
    needed = RECIPE_MIN_CAPABILITY[precision.fp8_recipe]
    if capability < needed:
        raise PrecisionError(
            f"{where}.fp8_recipe={precision.fp8_recipe!r} needs a "
            f"{RECIPE_GPU_NAMES[precision.fp8_recipe]} GPU (compute capability >= "
            f"{needed[0]}.{needed[1]}); this GPU is {capability[0]}.{capability[1]}"
        )
