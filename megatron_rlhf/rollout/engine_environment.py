"""The environment vLLM's processes start with, set in this process only while they start.

vLLM reads its CPU settings (``VLLM_CPU_OMP_THREADS_BIND``, ``VLLM_CPU_KVCACHE_SPACE``, the
engine-core's ``OMP_NUM_THREADS``, the workers' ``MKL_NUM_THREADS``), the folders of its sockets and temporary files
(:mod:`.engine_scratch`) and our IPC ledger's path (:mod:`.vllm_plugin`) from environment
variables; its engine-core process is started with ``multiprocessing`` (spawn), which gives a
child this process's environment and has no per-child option, and the engine-core passes them on
to its workers. So an engine's variables must be in this process's environment while
``LLM(...)`` starts its processes, and only then: :func:`engine_environment` is the one place
that sets them.

Guarantees: the variables are set under one process-wide lock (two engines starting at once in
one process each start with their own) and every one is restored to its previous value, or
removed, when the engine has started or failed to; this process's temporary folder
(``tempfile.gettempdir()``, which Python caches on first use) is fixed before ``TMPDIR`` may
point into an engine's scratch folder, so another thread of this process making a temporary file
meanwhile (the actor rank loads its model while its colocated engine starts) writes to the user's
folder, not to one deleted at the engine's shutdown.

Not guaranteed: a subprocess that another thread of this process starts during an engine's
start-up inherits the engine's variables (none of this project's code starts one there); vLLM's
own changes to the environment (its CPU platform sets ``LD_PRELOAD``, ``LOCAL_WORLD_SIZE`` and
others in the process that creates the engine) are vLLM's and stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping

from megatron_rlhf.config.cpu_split import (
    AUTO,
    BIND_ENV,
    NOBIND,
    engine_process_environment,
    resolve_engine_bind,
    split_cpu_cores,
    usable_cores,
)
from megatron_rlhf.config.rollout import RolloutConfig
from megatron_rlhf.rollout.vllm_plugin import IDLE_SPIN_ENV, idle_spin_seconds

CPU_IDLE_SPIN_S = 0.05
"""How long a CPU engine's worker busy-waits for its next message before sleeping (vLLM: 1 s;
see :mod:`megatron_rlhf.rollout.vllm_plugin`). Decoding steps follow each other within
milliseconds, so generation never waits on the socket."""

log = logging.getLogger(__name__)

_STARTING = threading.Lock()


@contextlib.contextmanager
def engine_environment(variables: Mapping[str, str | None] | Callable[[], Mapping[str, str | None]]
                       ) -> Iterator[None]:
    """While inside: ``variables`` are in this process's environment (a None value: the variable
    is absent), so processes started here inherit them; on leaving, the previous values are back
    (see the module docstring). A callable is called under the lock: variables computed from the
    environment (the user's settings) then never see another engine's while it starts."""
    tempfile.gettempdir()  # cached from now on: TMPDIR below changes no temporary file of this process
    with _STARTING:
        if callable(variables):
            variables = variables()
        saved = {name: os.environ.get(name) for name in variables}
        for name, value in variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def cpu_process_environment(config: RolloutConfig) -> dict[str, str | None]:
    """The variables a CPU engine's processes start with: its KV cache size (unless the user's
    ``VLLM_CPU_KVCACHE_SPACE`` is set), its workers' idle spin (:data:`CPU_IDLE_SPIN_S` unless the
    user's :data:`~megatron_rlhf.rollout.vllm_plugin.IDLE_SPIN_ENV` is set) and its workers' core binding (``config.cpu_threads_bind``,
    resolved by :func:`~megatron_rlhf.config.cpu_split.resolve_engine_bind`; auto on its own: the
    cores left after one for the engine-core process and one for this process). Logged."""
    standalone = split_cpu_cores(usable_cores(), 0, (config.tensor_parallel,)).engine_binds[0]
    bind, source = resolve_engine_bind(config.cpu_threads_bind, standalone, os.environ.get(BIND_ENV))
    variables = engine_process_environment(bind)
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        variables["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_gib)
    if IDLE_SPIN_ENV in os.environ:  # the user's, checked here: vLLM's processes would fail on it late
        idle_spin_seconds(os.environ[IDLE_SPIN_ENV])
    else:  # an idle worker gives its core back to the trainer's ranks
        variables[IDLE_SPIN_ENV] = str(CPU_IDLE_SPIN_S)
    extra = "; engine-core process: 1 torch thread; MKL threads follow OpenMP's" if bind != "nobind" else ""
    log.info("vLLM CPU engine (TP %d): workers' OpenMP threads bound to %s (%s)%s", config.tensor_parallel, bind,
             source, extra)
    return variables


def in_process_environment(config: RolloutConfig) -> dict[str, str | None]:
    """The variables an in-process CPU engine (:mod:`.engine_in_process`) starts with: its KV cache
    size (unless the user's ``VLLM_CPU_KVCACHE_SPACE`` is set). No core binding: it computes on
    this process's torch threads. Logged."""
    import torch

    variables: dict[str, str | None] = {}
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        variables["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kv_cache_gib)
    if config.cpu_threads_bind not in (AUTO, NOBIND):
        log.info("vLLM CPU engine in this process: cpu_threads_bind=%s does not apply", config.cpu_threads_bind)
    log.info("vLLM CPU engine (TP 1) in this process, on its %d torch thread(s)", torch.get_num_threads())
    return variables
