"""One entry to set up torch.distributed and Megatron's model-parallel groups.

:func:`initialize_parallel` picks NCCL when CUDA is available and gloo otherwise, enables the CPU
support module on CPU, builds Megatron's TP/PP/DP/CP/EP groups for a validated layout, seeds the
RNGs (including Megatron's tensor-parallel RNG tracker) and returns a :class:`ParallelState`
holding the process groups, which callers pass down explicitly.

Reads the standard launcher environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK)
as set by torchrun, Ray workers or :mod:`megatron_rlhf.parallel.launch`. Ray worker groups instead
pass a rendezvous store that rank 0 opened *before* announcing its port
(:func:`open_rendezvous_store`): a port found free and bound later can be taken in between by any
outgoing connection on the node (seen under Slurm: EADDRINUSE), a port already listening cannot.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rlhf.config.parallel import ParallelConfig, ParallelLayoutError
from megatron_rlhf.parallel import cpu_support, gloo_collectives
from megatron_rlhf.parallel.megatron_compat import (
    apply_release_fixes,
    call_with_supported_kwargs,
    megatron_core_version,
    process_group_collection,
)


@dataclass(frozen=True)
class ParallelState:
    """This process's place in the layout and the groups it talks over."""

    config: ParallelConfig
    world_size: int
    rank: int
    data_parallel_size: int
    tensor_parallel_rank: int
    pipeline_parallel_rank: int
    data_parallel_rank: int
    expert_parallel_rank: int
    device: torch.device
    backend: str
    groups: Any
    """megatron.core.process_groups_config.ProcessGroupCollection (tp, pp, dp, cp, ep, ...)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_parallel_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_parallel_rank == self.config.pipeline_parallel - 1


def open_rendezvous_store(world_size: int, timeout_minutes: int = 30) -> Any:
    """Rank 0's rendezvous store, listening on a port the OS picked (``store.port``)."""
    return torch.distributed.TCPStore(
        "0.0.0.0", 0, world_size, is_master=True,
        timeout=datetime.timedelta(minutes=timeout_minutes), wait_for_workers=False,
    )


def join_rendezvous_store(address: str, port: int, world_size: int, timeout_minutes: int = 30) -> Any:
    """A client of the store rank 0 opened at ``address:port``."""
    return torch.distributed.TCPStore(
        address, port, world_size, is_master=False, timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def initialize_parallel(
    config: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30, store: Any = None,
) -> ParallelState:
    """Initialise torch.distributed (if needed) and Megatron's parallel state for ``config``.

    ``store``: a rendezvous store (:func:`open_rendezvous_store` on rank 0,
    :func:`join_rendezvous_store` elsewhere) used instead of MASTER_ADDR/MASTER_PORT.

    Raises :class:`ParallelLayoutError` when the world size does not fit the layout.
    """
    megatron_core_version()  # fails early with a clear message when megatron-core is missing
    from megatron.core import parallel_state, tensor_parallel

    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    data_parallel_size = config.data_parallel(world_size)

    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank % torch.cuda.device_count())))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        cpu_support.enable()
        device = torch.device("cpu")
    apply_release_fixes()

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend=backend,
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            store=store,
        )
    elif torch.distributed.get_world_size() != world_size:
        raise ParallelLayoutError(
            f"torch.distributed has world size {torch.distributed.get_world_size()} but "
            f"WORLD_SIZE={world_size}"
        )

    if backend == "gloo":
        gloo_collectives.install()  # uneven SP gathers of the MoE dispatcher (TP > 1)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    call_with_supported_kwargs(
        parallel_state.initialize_model_parallel,
        off_values={"create_gloo_process_groups": False},
        tensor_model_parallel_size=config.tensor_parallel,
        pipeline_model_parallel_size=config.pipeline_parallel,
        context_parallel_size=config.context_parallel,
        expert_model_parallel_size=config.expert_parallel,
        expert_tensor_parallel_size=config.expert_tensor_parallel,
        distributed_timeout_minutes=timeout_minutes,
        # The distributed optimizer reads gloo twins of the data-parallel groups, on GPU and CPU.
        create_gloo_process_groups=True,
    )
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelState(
        config=config,
        world_size=world_size,
        rank=rank,
        data_parallel_size=data_parallel_size,
        tensor_parallel_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_parallel_rank=parallel_state.get_pipeline_model_parallel_rank(),
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        expert_parallel_rank=parallel_state.get_expert_model_parallel_rank(),
        device=device,
        backend=backend,
        groups=process_group_collection(),
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and, when present, CUDA) generators."""
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % (2**32))
    except ImportError:
        pass
    torch.manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down Megatron's parallel state and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
