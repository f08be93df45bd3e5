"""Worker side shared by this package's vLLM weight-transfer backends (``gloo``, ``shm``).

Both backends receive weights in checkpoint (HF) format and load them through vLLM's supported
layerwise reload (``initialize_layerwise_reload`` in ``start_weight_update``,
``model.load_weights`` per bucket, ``finalize_layerwise_reload`` in ``finish_weight_update``);
each backend only implements how a bucket arrives (:meth:`receive_weights`).

One vLLM defect is worked around here, in one place: in vLLM 0.32 a weight *update* of an
unquantized fused-MoE layer on CPU skips the expert kernel's own weight processing
(``UnquantizedFusedMoEMethod._setup_kernel`` calls ``fused_experts.process_weights_after_loading``
only on the first load), so the CPU grouped-GEMM kernel receives raw instead of prepacked expert
weights and every MoE layer computes garbage after a reload (a tiny Qwen3-MoE's log-probs moved by
0.1 after reloading its own unchanged checkpoint). :func:`moe_kernel_processing_on_update`
re-runs that step for exactly the layers where vLLM skipped it, and only then: a vLLM that runs
it itself is detected per call and left alone, so the fix can never prepack twice.

Guarantees: a layer's processed weights equal what a fresh engine load of the same weights
produces (tested by the MoE sync check at 1e-3 in fp32); the patches are per instance and
removed in ``finish_weight_update``, also when loading raised.
"""

from __future__ import annotations

import functools
from typing import Any


def _cpu_expert_kernels(model: Any):
    """``(layer, quant_method, fused_experts)`` of every unquantized fused-MoE layer on a CPU kernel."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a vLLM without CPU experts has nothing to fix
        return
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(method, UnquantizedFusedMoEMethod) and isinstance(experts, CPUUnquantizedExperts):
            yield layer, method, experts


def moe_kernel_processing_on_update(model: Any) -> list[tuple[Any, str]]:
    """Patch CPU fused-MoE layers so a weight update runs the expert kernel's processing.

    Returns the ``(object, attribute)`` pairs patched, for :func:`remove_patches`.
    """
    patched: list[tuple[Any, str]] = []
    for layer, method, experts in _cpu_expert_kernels(model):
        ran = {"kernel": False}
        original_experts = experts.process_weights_after_loading
        original_method = method.process_weights_after_loading

        def experts_processing(target, _original=original_experts, _ran=ran):
            _ran["kernel"] = True
            return _original(target)

        def method_processing(target, _original=original_method, _experts=experts, _ran=ran):
            _ran["kernel"] = False
            result = _original(target)
            if not _ran["kernel"]:  # vLLM skipped the kernel's prepack for an update: run it
                _experts.process_weights_after_loading(target)
            return result

        experts.process_weights_after_loading = experts_processing
        method.process_weights_after_loading = method_processing
        patched += [(experts, "process_weights_after_loading"), (method, "process_weights_after_loading")]
    return patched


def remove_patches(patched: list[tuple[Any, str]]) -> None:
    """Drop the instance attributes set by :func:`moe_kernel_processing_on_update`."""
    for owner, name in patched:
        owner.__dict__.pop(name, None)


@functools.cache
def reload_engine_base():
    """The base class of both worker-side engines (defined against the installed vLLM)."""
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    class LayerwiseReloadEngine(WeightTransferEngine):
        """Checkpoint-format updates through vLLM's layerwise reload; subclasses receive buckets."""

        supports_draft_weight_update = False

        def __init__(self, config, vllm_config, device, model) -> None:
            super().__init__(config, vllm_config, device, model)
            self._patches: list[tuple[Any, str]] = []

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload.layerwise import (
                initialize_layerwise_reload,
            )

            remove_patches(self._patches)
            self._patches = moe_kernel_processing_on_update(self.model)
            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload.layerwise import (
                finalize_layerwise_reload,
            )

            try:
                finalize_layerwise_reload(self.model, self.model_config)
            finally:
                remove_patches(self._patches)
                self._patches = []

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # The base class synchronises an accelerator afterwards; these transports copy
            # synchronously on the host.
            self.receive_weights(self.parse_update_info(update_info))

    return LayerwiseReloadEngine


def buffered_weights_inspectable() -> bool:
    """Whether this vLLM's layerwise reload exposes what it buffers (``loaded_weights``)."""
    try:
        from dataclasses import fields

        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info  # noqa: F401
        from vllm.model_executor.model_loader.reload.types import LayerReloadingInfo
    except ImportError:
        return False
    return "loaded_weights" in {field.name for field in fields(LayerReloadingInfo)}


def copy_buffered_weights(model: Any, buffer: Any) -> int:
    """Replace every tensor the layerwise reload still buffers that lies in ``buffer`` by a copy.

    Layerwise reload keeps the tensors given to ``load_weights`` until their layer is complete
    (a layer split across buckets; layers with padding, processed at ``finish``). Called after
    each bucket whose tensors are views of a buffer about to be reused; returns the count copied.
    """
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    start = buffer.data_ptr()
    end = start + buffer.numel() * buffer.element_size()
    copied = 0
    for layer in model.modules():
        for _, bound in get_layerwise_info(layer).loaded_weights:
            for key, value in bound.arguments.items():
                if hasattr(value, "data_ptr") and start <= value.data_ptr() < end:
                    bound.arguments[key] = value.clone()
                    copied += 1
    return copied
