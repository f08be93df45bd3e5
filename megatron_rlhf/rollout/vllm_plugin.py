"""vLLM general plugin: registers megatron-rlhf's weight-transfer backends ``gloo`` and ``shm``.

Declared as the ``vllm.general_plugins`` entry point ``megatron_rlhf`` in ``setup.py``; vLLM
calls :func:`register` in every process it starts (engine core, workers), which is where the
worker-side engines must be known. Safe to call more than once.

- ``gloo`` (:mod:`megatron_rlhf.rollout.gloo_transfer`): a private gloo group, any hosts;
- ``shm`` (:mod:`megatron_rlhf.rollout.shm_transfer`): a POSIX shared-memory segment, same host.
"""

from __future__ import annotations


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from megatron_rlhf.rollout import gloo_transfer, shm_transfer

    for transport in (gloo_transfer, shm_transfer):
        try:
            WeightTransferEngineFactory.register_engine(transport.BACKEND_NAME, transport.build_engine_classes())
        except ValueError as error:  # registered already in this process
            if "already registered" not in str(error):
                raise
