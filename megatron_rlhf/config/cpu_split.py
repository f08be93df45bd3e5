"""How a CPU run splits the machine's cores between its processes (pure functions, light types).

Why: on the CPU platform every process of a run computes with OpenMP threads: each vLLM worker
(its threads bound to cores, ``VLLM_CPU_OMP_THREADS_BIND``) and each Megatron rank (torch's
intra-op pool). vLLM's engine-core process (the scheduler, a busy loop while requests run) and the
process that drives the engine (it polls and detokenises each step) need a core besides. Given
every core each (``OMP_NUM_THREADS=MKL_NUM_THREADS=nproc``), they oversubscribe the machine:
measured on 2 cores, generation took 2.0 s per GRPO step instead of 0.13 s
(``benchmarks/results/grpo_vs_trl_cpu_097ef1c.md``; the worst of it: vLLM's worker, bound to one
core, inherited ``MKL_NUM_THREADS=2``, see :func:`engine_process_environment`). So the stack
divides the cores itself.

The rule (:func:`split_cpu_cores`), for the ``C`` cores this process may run on:

- engines: one core is reserved per engine (its engine-core process) and one for the controller
  (the process driving the engine; the Ray driver). The rest, at least one core per vLLM worker,
  goes to the engines' workers in contiguous blocks of equal size, in core-id order: each worker's
  OpenMP threads are bound to its block (2 cores, one engine of TP 1: the worker gets core 0 and
  one thread, core 1 is left to the engine-core and the controller);
- Megatron ranks: in synchronous rollouts the engines idle while the ranks compute, so the ranks
  share every core: ``C // ranks`` torch threads each (at least 1). With overlapped rollouts
  (``one_step_off``) engines and ranks compute at once: the unreserved cores are shared equally
  between the engines' workers and the ranks.

Guarantees: the functions are pure (same inputs, same split); every thread count is >= 1; a bind
names only the given cores, one ``|``-separated block per vLLM worker, in vLLM's syntax; when
there are fewer cores than workers, blocks repeat cores and :attr:`CpuSplit.oversubscribed` says
so. Validation of a user's bind string (:func:`check_engine_bind`) raises naming the key.
Not guaranteed: that other programs leave the cores idle; a CPU quota counts as its whole cores
(rounded up, the first of the affinity's ids); NUMA placement (cores in id order);
that the split is the fastest for a given model (explicit settings win: ``threads_per_rank``,
``engine_cpu_bind``, the environment's ``VLLM_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
"""vLLM's setting of its CPU workers' OpenMP core binding (``auto``, ``nobind`` or core lists)."""
AUTO = "auto"
NOBIND = "nobind"


@dataclass(frozen=True)
class CpuSplit:
    """The cores of one CPU machine divided between a run's processes (see the module docstring)."""

    cores: tuple[int, ...]
    """The core ids the run may use (this process's CPU affinity)."""
    rank_threads: int
    """torch intra-op threads of each Megatron rank."""
    engine_binds: tuple[str, ...]
    """``VLLM_CPU_OMP_THREADS_BIND`` of each engine: one core block per vLLM worker, ``|``-separated."""
    oversubscribed: bool = False
    """More vLLM workers than cores: blocks share cores."""


def usable_cores(cgroup_root: str = "/sys/fs/cgroup") -> tuple[int, ...]:
    """The core ids this process may run on: its CPU affinity (taskset, cgroup cpusets), cut to the
    first ``ceil(quota / period)`` of them under a CPU quota (``docker --cpus``, a Kubernetes
    limit: :func:`cpu_quota_cores`), so a container allowed 4 CPUs of a 64-core host splits 4."""
    try:
        cores = tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = tuple(range(os.cpu_count() or 1))
    quota = cpu_quota_cores(cgroup_root)
    return cores[:quota] if quota is not None and quota < len(cores) else cores


def cpu_quota_cores(cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """Whole cores of this process's cgroup CPU quota, rounded up (at least 1), or None without
    one: cgroup v2 ``cpu.max`` (``max 100000`` means none), else v1 ``cpu.cfs_quota_us`` (-1: none)
    over ``cpu.cfs_period_us``. Unreadable or malformed files count as no quota."""
    def read(*names: str) -> str | None:
        try:
            return open(os.path.join(cgroup_root, *names)).read().strip()
        except OSError:
            return None

    quota_text, period_text = None, None
    v2 = read("cpu.max")
    if v2 is not None:
        quota_text, _, period_text = v2.partition(" ")
    else:
        quota_text, period_text = read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us")
    try:
        quota, period = int(quota_text or ""), int(period_text or "")
    except ValueError:  # "max", missing files
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))


def split_cpu_cores(cores: Sequence[int], megatron_ranks: int, engine_tensor_parallels: Sequence[int],
                    overlapped: bool = False) -> CpuSplit:
    """The split of ``cores`` between ``megatron_ranks`` ranks and engines of these vLLM TP sizes;
    ``overlapped``: engines generate while the ranks compute (one-step-off rollouts). Pure."""
    cores = tuple(cores)
    if not cores:
        raise ValueError("split_cpu_cores needs at least one core")
    if megatron_ranks < 0 or any(tp < 1 for tp in engine_tensor_parallels):
        raise ValueError(f"megatron_ranks={megatron_ranks} must be >= 0 and engine TP sizes >= 1, "
                         f"got {list(engine_tensor_parallels)}")
    workers = sum(engine_tensor_parallels)
    reserved = len(engine_tensor_parallels) + 1 if workers else 0
    free = max(0, len(cores) - reserved)
    if not workers:
        engine_cores = 0
    elif overlapped and megatron_ranks:
        engine_cores = max(workers, free * workers // (workers + megatron_ranks))
    else:
        engine_cores = max(workers, free)
    per_worker = max(1, engine_cores // workers) if workers else 0
    blocks = [_block(cores, worker * per_worker, per_worker) for worker in range(workers)]
    binds, start = [], 0
    for tp in engine_tensor_parallels:
        binds.append("|".join(format_cores(block) for block in blocks[start:start + tp]))
        start += tp
    rank_cores = max(0, free - engine_cores) if overlapped and workers else len(cores)
    rank_threads = max(1, rank_cores // megatron_ranks) if megatron_ranks else 1
    return CpuSplit(cores, rank_threads, tuple(binds), oversubscribed=workers > len(cores))


def _block(cores: tuple[int, ...], start: int, size: int) -> list[int]:
    """``size`` cores from position ``start``, wrapping around when the cores run out."""
    return [cores[(start + offset) % len(cores)] for offset in range(size)]


def format_cores(ids: Sequence[int]) -> str:
    """Core ids in vLLM's list syntax: ranges for consecutive ids (``[0, 1, 2, 5]`` -> ``0-2,5``)."""
    parts, ids = [], list(ids)
    index = 0
    while index < len(ids):
        end = index
        while end + 1 < len(ids) and ids[end + 1] == ids[end] + 1:
            end += 1
        parts.append(str(ids[index]) if end == index else f"{ids[index]}-{ids[end]}")
        index = end + 1
    return ",".join(parts)


def parse_cores(text: str) -> list[int]:
    """Core ids of one block in vLLM's syntax (``0-2,5``); ValueError on anything else."""
    ids: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise ValueError(f"{text!r} is not a core list like '0-3' or '0,2,4'")
        ids.extend(range(int(low), int(high or low) + 1))
    return ids


def check_engine_bind(bind: str, tensor_parallel: int, key: str) -> None:
    """Raise ValueError naming ``key`` unless ``bind`` is ``auto``, ``nobind`` or one core list per
    vLLM worker (``tensor_parallel`` of them, ``|``-separated), as vLLM itself requires."""
    if not isinstance(bind, str):
        raise ValueError(f"{key}={bind!r} must be a string: auto, nobind or core lists such as '0-3|4-7'")
    if bind in (AUTO, NOBIND):
        return
    blocks = bind.split("|")
    if len(blocks) != tensor_parallel:
        raise ValueError(f"{key}={bind!r} has {len(blocks)} core list(s) but the engine has tensor_parallel="
                         f"{tensor_parallel} workers: give one per worker, separated by '|' (or auto / nobind)")
    for block in blocks:
        try:
            parse_cores(block)
        except ValueError as error:
            raise ValueError(f"{key}={bind!r}: {error}") from None


def resolve_engine_bind(requested: str, computed: str, environment_value: str | None) -> tuple[str, str]:
    """``(bind, where it came from)`` for one CPU engine: an explicit ``requested`` value wins, then
    the user's ``VLLM_CPU_OMP_THREADS_BIND`` (``environment_value``), then the ``computed`` split."""
    if requested != AUTO:
        return requested, "config"
    if environment_value:
        return environment_value, f"environment {BIND_ENV}"
    return computed, "core split"


def engine_process_environment(bind: str) -> dict[str, str | None]:
    """The variables vLLM's processes of a CPU engine with ``bind`` start with (None: absent).

    The bind itself and, unless ``nobind`` (where the workers take ``OMP_NUM_THREADS`` threads
    wherever the OS puts them): one torch thread for the engine-core process, which only schedules
    (vLLM keeps an inherited ``OMP_NUM_THREADS`` there), and no ``MKL_NUM_THREADS``. vLLM sets a
    bound worker's ``OMP_NUM_THREADS`` to its block's size but passes ``MKL_NUM_THREADS`` on: MKL's
    matrix products would run that many threads on the worker's cores (measured on 2 cores, with
    ``MKL_NUM_THREADS=2`` inherited: 64 responses of 32 tokens in 6.4-10.5 s instead of 0.27-0.55 s,
    two MKL threads taking turns on the one bound core); unset, MKL follows OpenMP's count."""
    if bind == NOBIND:
        return {BIND_ENV: bind}
    return {BIND_ENV: bind, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": None}
