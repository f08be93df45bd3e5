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

And it keeps a ledger of the inter-process objects (shared-memory segments, semaphores) that
vLLM's processes register with Python's resource tracker, when the engine asks for one
(:data:`IPC_LEDGER_ENV`). vLLM unlinks a message queue's segment only when the queue object is
garbage-collected, which a process stopped at shutdown never does; Python's resource tracker
then reported "leaked shared_memory objects" after the command's last line. The engine releases
what the ledger shows still registered once its processes are gone (:func:`release_ipc_names`).
A ledger's name carries the pid of the engine that started it; a run killed with SIGKILL leaves
its ledger and the objects in it, and the next engine started on the host releases every ledger
whose engine is dead (:func:`release_orphaned_ledgers`).

And, when the engine names one (:data:`IDLE_SPIN_ENV`, CPU engines), it shortens how long a vLLM
worker busy-waits for its next message once generation stops. vLLM's shared-memory queue reader
spins (``sched_yield`` in a loop) for a hard-coded second after its last read before it sleeps on
a socket; after every rollout the worker therefore held a core at 100% for a second, measured on
2 cores, while the trainer's ranks ran their passes and update there. Between two decoding steps
the next message arrives within milliseconds, so a short spin keeps generation's latency, and an
idle worker wakes on the queue's socket ping. Applied where vLLM's reader has that parameter
(``SpinCondition(busy_loop_s=...)``, vLLM 0.32); elsewhere logged and left alone.

And, in vLLM's engine-core and worker processes only, it ends the process with ``os._exit`` once
its ``atexit`` handlers have run, skipping the interpreter's teardown of the torch + vLLM heap
(3.4 s -> 0.8 s per engine shutdown; :mod:`megatron_rlhf.rollout.engine_process_exit`).

And, on CPU platforms, it counts the sampled tokens' ranks eagerly instead of compiling vLLM's
kernel for it in each process (3.7 s of every CPU engine's first rollout;
:mod:`megatron_rlhf.rollout.sampler_rank`).
"""

from __future__ import annotations

import contextlib
import logging
import os

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


IPC_LEDGER_ENV = "MEGATRON_RLHF_IPC_LEDGER"
"""Path of the ledger file; set by the engine while it starts vLLM's processes
(:mod:`megatron_rlhf.rollout.engine_environment`)."""

LEDGER_PREFIX = "megatron_rlhf_ipc_"
LEDGER_SUFFIX = ".ledger"


def start_ipc_ledger(directory: str | None = None) -> str:
    """A fresh ledger file ``<directory>/megatron_rlhf_ipc_<pid>_<random>.ledger`` (the system
    temporary directory by default); the engine names it in :data:`IPC_LEDGER_ENV` for vLLM's
    processes while they start."""
    import tempfile

    handle, path = tempfile.mkstemp(prefix=f"{LEDGER_PREFIX}{os.getpid()}_", suffix=LEDGER_SUFFIX, dir=directory)
    os.close(handle)
    return path


def _append(path: str, line: str) -> None:
    """Append one line to the ledger at ``path`` if it still exists. Never creates it: the process
    that starts an engine loads this plugin too, and its hooks outlive the engine; a lock it makes
    after the engine released (and removed) the ledger must not bring the file back."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        return
    with os.fdopen(descriptor, "a", encoding="utf-8") as ledger:  # one short line per write: appends stay whole
        ledger.write(line + "\n")


def record_ipc_names() -> None:
    """In vLLM's engine-core and worker processes started with :data:`IPC_LEDGER_ENV` set: record
    every name the process registers with, or unregisters from, Python's resource tracker.
    Never in the process that starts the engine (it loads this plugin too, while the variable is
    set): its own objects are its own to release, and an engine's shutdown releasing them would
    unlink what it still uses. Idempotent."""
    from multiprocessing import resource_tracker

    from megatron_rlhf.rollout.engine_process_exit import in_vllm_engine_process

    path = os.environ.get(IPC_LEDGER_ENV)
    if not path or getattr(resource_tracker, "_megatron_rlhf_ledger", None) == path:
        return
    if not in_vllm_engine_process():
        return
    original_register, original_unregister = resource_tracker.register, resource_tracker.unregister

    def register(name: str, rtype: str) -> None:
        _append(path, f"+ {rtype} {name}")
        original_register(name, rtype)

    def unregister(name: str, rtype: str) -> None:
        _append(path, f"- {rtype} {name}")
        original_unregister(name, rtype)

    resource_tracker.register, resource_tracker.unregister = register, unregister
    resource_tracker._megatron_rlhf_ledger = path


def release_ipc_names(path: str, untrack: bool = True) -> list[str]:
    """Once the processes that wrote the ledger at ``path`` are gone: unlink the segments and
    semaphores they registered and never released, take them off this process's resource tracker
    (``untrack``: so it has nothing to report at exit; only for a ledger this process started),
    and remove the ledger. Returns the names released."""
    import _multiprocessing
    from multiprocessing import resource_tracker, shared_memory

    if not os.path.exists(path):
        return []
    live: dict[tuple[str, str], None] = {}
    with open(path, encoding="utf-8") as ledger:
        for line in ledger:
            sign, rtype, name = line.rstrip("\n").split(" ", 2)
            if sign == "+":
                live[(rtype, name)] = None
            else:
                live.pop((rtype, name), None)
    released = []
    for rtype, name in live:
        if rtype not in ("shared_memory", "semaphore"):
            continue
        unlink = shared_memory._posixshmem.shm_unlink if rtype == "shared_memory" else _multiprocessing.sem_unlink
        with contextlib.suppress(FileNotFoundError):
            unlink(name)
        if untrack:
            resource_tracker.unregister(name, rtype)
        released.append(name)
    os.unlink(path)
    return released


def release_orphaned_ledgers(directory: str | None = None) -> list[str]:
    """Release the ledgers (and the segments and semaphores in them) of engines that died without
    shutting down (SIGKILL, a cancelled job); the names released. A ledger whose engine's pid still
    runs in this pid namespace is left alone. Called by every engine before it starts vLLM."""
    import glob
    import tempfile

    from megatron_rlhf.parallel.ipc_orphans import pid_alive

    released: list[str] = []
    pattern = os.path.join(directory or tempfile.gettempdir(), f"{LEDGER_PREFIX}*{LEDGER_SUFFIX}")
    for path in glob.glob(pattern):
        owner = os.path.basename(path)[len(LEDGER_PREFIX):].split("_")[0]
        if not owner.isdigit() or pid_alive(int(owner)):
            continue
        try:
            released += release_ipc_names(path, untrack=False)
        except (FileNotFoundError, PermissionError, ValueError):  # released by another engine, another user's, torn
            continue
    if released:
        logging.getLogger(__name__).info("released %d shared-memory segment(s)/semaphore(s) left by killed "
                                         "engines: %s", len(released), ", ".join(released))
    return released


IDLE_SPIN_ENV = "MEGATRON_RLHF_ENGINE_IDLE_SPIN_S"
"""Seconds a vLLM worker busy-waits for its next message before sleeping (see the module
docstring); set by the engine for CPU engines (:mod:`megatron_rlhf.rollout.engine_environment`)."""


def idle_spin_seconds(raw: str) -> float:
    """:data:`IDLE_SPIN_ENV`'s value as seconds; ``ValueError`` naming the variable unless a number >= 0."""
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0.0:  # also refuses nan
        raise ValueError(f"{IDLE_SPIN_ENV}={raw!r}: must be a number of seconds >= 0")
    return seconds


def apply_idle_spin() -> float | None:
    """Make :data:`IDLE_SPIN_ENV`'s seconds the default spin of vLLM's shared-memory queue readers
    created from now on in this process; the value applied, or None (unset, or a vLLM whose reader
    has no ``busy_loop_s``: logged). The engine checks the value before vLLM starts
    (:func:`idle_spin_seconds`)."""
    raw = os.environ.get(IDLE_SPIN_ENV)
    if raw is None:
        return None
    seconds = idle_spin_seconds(raw)
    import inspect

    from vllm.distributed.device_communicators import shm_broadcast

    spin = getattr(shm_broadcast, "SpinCondition", None)
    parameters = list(inspect.signature(spin.__init__).parameters) if spin is not None else []
    if parameters[-1:] != ["busy_loop_s"] or not spin.__init__.__defaults__:
        logging.getLogger(__name__).info("%s=%s not applied: this vLLM's queue reader has no busy_loop_s",
                                         IDLE_SPIN_ENV, raw)
        return None
    spin.__init__.__defaults__ = spin.__init__.__defaults__[:-1] + (seconds,)
    return seconds


def register() -> None:
    """Register the worker-side engines (vLLM calls this in each of its processes)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from megatron_rlhf.rollout import gloo_transfer, shm_transfer

    for transport in (gloo_transfer, shm_transfer):
        _register_once(WeightTransferEngineFactory, transport.BACKEND_NAME, transport.build_engine_classes())
    layerwise = logging.getLogger(LAYERWISE_LOGGER)
    if not any(isinstance(existing, RotaryReloadNoise) for existing in layerwise.filters):
        layerwise.addFilter(RotaryReloadNoise())
    record_ipc_names()
    apply_idle_spin()
    from megatron_rlhf.rollout.engine_process_exit import apply_fast_exit

    apply_fast_exit()  # vLLM's engine-core and worker processes only
    from megatron_rlhf.rollout.sampler_rank import apply_eager_token_ranks

    apply_eager_token_ranks()  # CPU platforms only
    from megatron_rlhf.rollout.logprob_text import apply_no_logprob_text

    apply_no_logprob_text()  # only requests that ask for it (our rollouts)
