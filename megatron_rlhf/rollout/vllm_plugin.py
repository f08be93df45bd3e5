"""vLLM general plugin: registers megatron-rlhf's weight-transfer backends ``gloo`` and ``shm``.

Declared as the ``vllm.general_plugins`` entry point ``megatron_rlhf`` in ``setup.py``; vLLM
calls :func:`register` in every process it starts (engine core, workers), which is where the
worker-side engines must be known. Safe to call more than once.

- ``gloo`` (:mod:`megatron_rlhf.rollout.gloo_transfer`): a private gloo group, any hosts;
- ``shm`` (:mod:`megatron_rlhf.rollout.shm_transfer`): a POSIX shared-memory segment, same host.

It also silences one false alarm of vLLM's layerwise reload, logged on every weight update of
every RoPE model: ``RotaryEmbedding: Failed to load weights``. The rotary cos/sin cache is a
derived buffer that no checkpoint holds; vLLM puts the existing one back, which is correct.
Every other message of that logger passes.
"""

from __future__ import annotations

import logging

LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class RotaryReloadNoise(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


def _register_once(factory, name: str, engine_class) -> None:
    try:
        factory.register_engine(name, engine_class)
    except ValueError as error:  # registered already in this process
        if "already registered" not in str(error):
            raise


def register_trainer_engines() -> None:
    """Register the trainer-side engines with vLLM's trainer factory (in the trainer's process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from megatron_rlhf.rollout import gloo_transfer, shm_transfer

    for transport in (gloo_transfer, shm_transfer):
        _register_once(WeightTransferTrainerFactory, transport.BACKEND_NAME, transport.build_trainer_classes()[1])


def register() -> None:
    """Register the worker-side engines (vLLM calls this in each of its processes)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from megatron_rlhf.rollout import gloo_transfer, shm_transfer

    for transport in (gloo_transfer, shm_transfer):
        _register_once(WeightTransferEngineFactory, transport.BACKEND_NAME, transport.build_engine_classes())
    layerwise = logging.getLogger(LAYERWISE_LOGGER)
    if not any(isinstance(existing, RotaryReloadNoise) for existing in layerwise.filters):
        layerwise.addFilter(RotaryReloadNoise())
