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

Aborting an update (:func:`abort_weight_update_on_worker`, run in every vLLM worker as
``collective_rpc("abort_weight_update")`` through the :class:`WeightUpdateAbort` worker extension
when a sync fails half-way): every layer the update left open (on the meta
device, its loaders wrapped, its weights buffered) gets its previous weights back, the worker's
update session is closed and the patches removed, so the engine serves again and the next
``start_weight_update`` starts clean. Not guaranteed: layers the update had already completed
before the failure keep their new weights, so the engine holds a mix of the old and the new
weights until the next successful sync. It relies on vLLM's layerwise-reload internals
(``LAYERWISE_INFO``, ``_place_kernel_tensors``), checked against vLLM 0.32.

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


def abort_layerwise_reload(model: Any) -> int:
    """Give every layer an unfinished layerwise reload left open its previous weights back and
    close the reload; returns how many layers were put back (0 when no reload was open)."""
    from vllm.model_executor.model_loader.reload import layerwise

    restored = 0
    for layer in model.modules():
        info = layerwise.get_layerwise_info(layer)
        if not info.can_load():  # not in a reload, or already processed with its new weights
            continue
        if info.kernel_tensors is not None:
            layerwise._place_kernel_tensors(layer, info)  # the tensors the engine served before
            restored += 1
        info.reset()  # drops the buffered weights; the wrapped loaders were on the meta tensors
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    layerwise.LOADING_LAYERS.clear()
    return restored


def abort_weight_update_on_worker(worker: Any) -> int:
    """Close a vLLM worker's half-done weight update (module docstring); returns the layers put back."""
    engine = getattr(worker, "weight_transfer_engine", None)
    model = getattr(engine, "model", None) if engine is not None else None
    restored = abort_layerwise_reload(model if model is not None else worker.get_model())
    if engine is not None:
        remove_patches(getattr(engine, "_patches", []))
        if hasattr(engine, "_patches"):
            engine._patches = []
        engine.reset_weight_update_target()
    worker._weight_update_active = False
    return restored


class WeightUpdateAbort:
    """vLLM worker extension (``worker_extension_cls``, set by the rollout engine): adds
    ``abort_weight_update`` to every worker, called by name with ``collective_rpc``."""

    def abort_weight_update(self) -> int:
        return abort_weight_update_on_worker(self)


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
