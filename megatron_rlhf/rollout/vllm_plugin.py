"""vLLM general plugin: registers megatron-rlhf's ``gloo`` weight-transfer backend.

Declared as the ``vllm.general_plugins`` entry point ``megatron_rlhf`` in ``setup.py``; vLLM
calls :func:`register` in every process it starts (engine core, workers), which is where the
worker-side engine must be known. Safe to call more than once.
"""

from __future__ import annotations


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from megatron_rlhf.rollout.gloo_transfer import BACKEND_NAME, build_engine_classes

    try:
        WeightTransferEngineFactory.register_engine(BACKEND_NAME, build_engine_classes())
    except ValueError as error:  # registered already in this process
        if "already registered" not in str(error):
            raise
