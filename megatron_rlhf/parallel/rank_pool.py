"""A pool of persistent local ranks that run one torch.distributed job after another.

:func:`megatron_rlhf.parallel.launch.spawn` starts fresh processes for every job, and each of them
imports torch and Megatron-Core again (seconds of CPU per rank). A :class:`RankPool` starts its
processes once and sends them jobs: ``pool.run(function, world_size, *args)`` runs
``function(*args)`` on ranks ``0 .. world_size - 1`` of the pool, as a world of that size, and
returns the results in rank order, exactly like ``spawn``.

Guarantees, per job: every rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for that
job (a fresh free loopback port each time) and a fair share of CPU threads; afterwards Megatron's
parallel state and the default process group are destroyed (as ``spawn``'s children do at exit),
and the environment variables, working directory, torch's default dtype and the functions of
``torch.distributed`` (a job may wrap or forbid collectives) are put back, so the next job starts
from torch.distributed not initialised and unpatched. If any rank fails, exits or the job times
out, every process of the pool is ended and :class:`DistributedLaunchError` carries the failing
rank's traceback; the next job starts a fresh pool. No process outlives :meth:`RankPool.close`.

Does not guarantee: a pristine interpreter per job. Modules stay imported and module-level caches
stay filled, as when one process initialises Megatron for several layouts one after another.
A job that needs a fresh interpreter (say, one testing import-time behaviour) must use ``spawn``.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable

import torch

from megatron_rlhf.parallel.launch import DistributedLaunchError, enter_local_rank, free_port


def _run_job(rank: int, job: bytes) -> tuple[bool, bytes | str]:
    try:
        world_size, port, threads, function, args = pickle.loads(job)
    except Exception:  # noqa: BLE001 - say which import failed instead of dying silently
        return False, traceback.format_exc()
    environment, directory, dtype = dict(os.environ), os.getcwd(), torch.get_default_dtype()
    distributed_api = dict(vars(torch.distributed))
    enter_local_rank(rank, world_size, port, threads)
    try:
        return True, pickle.dumps(function(*args))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with the traceback
        return False, traceback.format_exc()
    finally:
        if torch.distributed.is_initialized():
            from megatron_rlhf.parallel.init import destroy_parallel

            destroy_parallel()
        os.environ.clear()
        os.environ.update(environment)
        os.chdir(directory)
        torch.set_default_dtype(dtype)
        _restore_attributes(torch.distributed, distributed_api)
        gc.collect()


def _restore_attributes(module: Any, saved: dict[str, Any]) -> None:
    """Put back module attributes a job replaced (say, a test wrapping ``all_reduce``)."""
    for name, value in saved.items():
        if getattr(module, name, None) is not value:
            setattr(module, name, value)


def _serve(rank: int, jobs: Any, results: Any) -> None:
    """A pool process: run each job sent to this rank until told to stop (``None``)."""
    while True:
        message = jobs.get()
        if message is None:
            return
        job_id, job = message
        ok, payload = _run_job(rank, job)
        results.put((job_id, rank, ok, payload))


class RankPool:
    """``size`` persistent processes; each :meth:`run` uses the first ``world_size`` of them."""

    def __init__(self, size: int, timeout_seconds: float = 1800.0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.timeout_seconds = timeout_seconds
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[Any] = []
        self._jobs: list[Any] = []
        self._results: Any = None
        self._job_ids = itertools.count()
        self.jobs_run = 0
        """Jobs completed since the pool was made (all ranks reported)."""
        self.starts = 0
        """How many times the processes were started (1 unless a job failed)."""

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self) -> None:
        self._results = self._context.Queue()
        self._jobs = [self._context.Queue() for _ in range(self.size)]
        self._processes = [
            self._context.Process(target=_serve, args=(rank, self._jobs[rank], self._results), daemon=False)
            for rank in range(self.size)
        ]
        for process in self._processes:
            process.start()
        self.starts += 1

    def run(self, function: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
        """Run ``function(*args)`` as a ``world_size``-rank job; return the results by rank.

        ``function`` must be importable (module level) and its arguments and result picklable.
        """
        if not 1 <= world_size <= self.size:
            raise ValueError(f"world_size must be in 1..{self.size} for this pool, got {world_size}")
        if not self._processes:
            self._start()
        threads = max(1, (os.cpu_count() or 1) // world_size)
        job = pickle.dumps((world_size, free_port(), threads, function, args))
        job_id = next(self._job_ids)
        for rank in range(world_size):
            self._jobs[rank].put((job_id, job))
        collected: dict[int, bytes] = {}
        failure = self._collect(job_id, world_size, collected)
        if failure is not None:
            self.close(terminate=True)
            rank, message = failure
            where = f"rank {rank}" if rank >= 0 else "launcher"
            raise DistributedLaunchError(f"{where} of {world_size} (rank pool) failed:\n{message}")
        self.jobs_run += 1
        return [pickle.loads(collected[rank]) for rank in range(world_size)]

    def _collect(self, job_id: int, world_size: int, collected: dict[int, bytes]) -> tuple[int, str] | None:
        deadline = time.monotonic() + self.timeout_seconds
        while len(collected) < world_size:
            try:
                got_id, rank, ok, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    return -1, f"timed out after {self.timeout_seconds} s waiting for ranks"
                for rank, process in enumerate(self._processes):
                    if process.exitcode is not None:
                        return rank, f"pool process exited with code {process.exitcode} during a job"
                continue
            if got_id != job_id:
                continue
            if not ok:
                return rank, payload
            collected[rank] = payload
        return None

    def close(self, terminate: bool = False) -> None:
        """Stop every process of the pool (asked to stop, or ended when ``terminate``)."""
        for process, jobs in zip(self._processes, self._jobs):
            if not terminate and process.is_alive():
                jobs.put(None)
        for process in self._processes:
            if terminate and process.is_alive():
                process.terminate()
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
        for channel in [*self._jobs, self._results]:
            if channel is not None:
                if terminate:
                    channel.cancel_join_thread()  # a job nobody will read must not block here
                channel.close()
                channel.join_thread()
        self._processes, self._jobs, self._results = [], [], None
