"""A CPU version of Megatron-Core's CUDA RNG states tracker.

Megatron keeps named RNG streams: the default one (same on every rank of a model replica), a
"model-parallel" one seeded ``seed + 2718 + tp_rank`` (different per TP rank, same across data
parallel replicas; used for dropout inside tensor-parallel regions) and an expert-parallel one.
:class:`CpuRNGStatesTracker` keeps those streams as CPU generator states with the same semantics
(``add``/``fork``/``get_states``/``set_states``/``reset``); :func:`install_cpu_rng_tracker` makes
Megatron use it, including when Megatron re-creates its tracker. Activation recomputation
(``tensor_parallel.random.checkpoint``) still uses CUDA states and is not supported on CPU.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch


class CpuRNGStatesTracker:
    """CPU version of Megatron's ``CudaRNGStatesTracker``: named generator states, forkable.

    ``fork(name)`` swaps the default CPU generator's state for the named one for the duration of
    the context, and stores the advanced state back afterwards, so consecutive forks continue the
    same stream. Seeds are registered once per name, as in Megatron.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists in the CPU RNG tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists in the CPU RNG tracker")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not added to the CPU RNG tracker")
        outside_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside_state)


def install_cpu_rng_tracker(cpu_torch: Any) -> None:
    """Make Megatron's tracker a :class:`CpuRNGStatesTracker` and seed on the CPU generator.

    ``cpu_torch`` is the CPU-routing torch proxy used as Megatron's ``random`` module's torch.
    """
    from megatron.core.tensor_parallel import random as megatron_random

    # Any (re-)initialisation of the tracker inside Megatron now builds the CPU tracker.
    megatron_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    megatron_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Megatron seeds the "default" CUDA generator; on CPU the default generator is torch's.
    megatron_random.torch = cpu_torch
    original_seed = megatron_random.model_parallel_cuda_manual_seed
    if getattr(original_seed, "_megatron_rlhf_cpu", False):
        return

    @functools.wraps(original_seed)
    def seed_on_cpu(seed: int, *args: Any, **kwargs: Any) -> None:
        torch.manual_seed(seed)
        kwargs.pop("te_rng_tracker", None)
        kwargs.pop("use_cudagraphable_rng", None)
        original_seed(seed, *args, **kwargs)

    seed_on_cpu._megatron_rlhf_cpu = True  # type: ignore[attr-defined]
    megatron_random.model_parallel_cuda_manual_seed = seed_on_cpu
    import megatron.core.tensor_parallel as tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed = seed_on_cpu
