"""Start N local processes that form one torch.distributed job, from a single command.

Used by the checkpoint tools (each "runs as one command") and by the distributed tests. Under
torchrun or a Ray worker group the environment is already set and :func:`run_distributed` runs
the function in-process instead of spawning.

Guarantees: every child gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT on a free
loopback port (outside the ranges other processes' sockets land in; a job whose port was taken
anyway before its rendezvous is started again) and a fair share of CPU threads; the result of each rank is returned in rank order;
if any rank fails, the others are terminated and :class:`DistributedLaunchError` carries the
failing rank's traceback. No process outlives the call.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import random
import socket
import time
import traceback
from typing import Any, Callable

import torch


log = logging.getLogger(__name__)
Launcher = Callable[..., list[Any]]
"""Runs a job on local ranks: ``launcher(function, world_size, *args)`` returns ``function(*args)``'s
result of each rank, in rank order (:func:`run_distributed`, or a persistent
:class:`~megatron_rlhf.parallel.rank_pool.RankPool`'s ``run``)."""


class DistributedLaunchError(RuntimeError):
    """A rank of a locally launched job failed; the message holds its traceback."""


RENDEZVOUS_PORTS = (20000, 32768)
"""Where :func:`free_port` looks first: above Ray's worker ports (10002-19999 by default) and
below Linux's usual ephemeral range (32768-60999), where every socket bound to port 0 lands
(Ray's, vLLM's, the OS's outgoing ones), so that another process rarely takes the port
between the check and the rendezvous."""


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return RENDEZVOUS_PORTS[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (see :data:`RENDEZVOUS_PORTS`; any free
    port when none is free there)."""
    low, high = RENDEZVOUS_PORTS[0], min(RENDEZVOUS_PORTS[1], _ephemeral_start())
    chooser = random.SystemRandom()  # never the seeded global generator: two jobs would pick alike
    for _ in range(64 if high > low else 0):
        port = chooser.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rendezvous_port_taken(message: str, port: int) -> bool:
    """Whether a rank's failure is its rendezvous store finding ``port`` taken (before any work)."""
    return "EADDRINUSE" in message and f"port: {port}," in message


def enter_local_rank(rank: int, world_size: int, port: int, threads: int) -> None:
    """Make this process local rank ``rank`` of ``world_size`` (torchrun's environment variables,
    rendezvous on 127.0.0.1:``port``) with ``threads`` torch intra-op threads."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)


def _child(
    rank: int,
    world_size: int,
    port: int,
    threads: int,
    function: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    enter_local_rank(rank, world_size, port, threads)
    try:
        # Plain pickle bytes: torch's queue reductions share tensors through file descriptors
        # that disappear when this process exits, before the parent may have read them.
        results.put((rank, True, pickle.dumps(function(*args))))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            try:
                from megatron_rlhf.parallel.init import destroy_parallel

                destroy_parallel()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


def spawn(
    function: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_seconds: float = 1800.0,
) -> list[Any]:
    """Run ``function(*args)`` in ``world_size`` fresh processes; return results by rank.

    ``function`` must be importable (module level) and its arguments and result picklable. A job
    whose rendezvous port was taken by another process before rank 0 listened on it (nothing
    has run yet) is started again on another port, up to three times in all.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for attempt in range(3):
        port = free_port()
        try:
            return _spawn_on(port, function, world_size, args, timeout_seconds)
        except DistributedLaunchError as error:
            if attempt == 2 or not rendezvous_port_taken(str(error), port):
                raise
            log.warning("rendezvous port %d was taken by another process; starting the %d ranks again", port,
                        world_size)
    raise AssertionError("unreachable")


def _spawn_on(port: int, function: Callable[..., Any], world_size: int, args: tuple,
              timeout_seconds: float) -> list[Any]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    processes = [
        context.Process(
            target=_child,
            args=(rank, world_size, port, threads, function, args, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    failure: tuple[int, str] | None = None
    deadline = time.monotonic() + timeout_seconds
    try:
        while len(collected) < world_size and failure is None:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    failure = (-1, f"timed out after {timeout_seconds} s waiting for ranks")
                for rank, process in enumerate(processes):
                    if rank not in collected and process.exitcode is not None:
                        # Give a result that was queued just before exit a moment to arrive.
                        try:
                            late = results.get(timeout=5.0)
                        except queue.Empty:
                            failure = (
                                rank,
                                f"exited with code {process.exitcode} without reporting a result",
                            )
                            break
                        rank, ok, payload = late
                        if ok:
                            collected[rank] = payload
                        else:
                            failure = (rank, payload)
                        break
                continue
            if ok:
                collected[rank] = payload
            else:
                failure = (rank, payload)
    finally:
        for process in processes:
            if failure is not None and process.is_alive():
                process.terminate()
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
    if failure is not None:
        rank, message = failure
        where = f"rank {rank}" if rank >= 0 else "launcher"
        raise DistributedLaunchError(f"{where} of {world_size} failed:\n{message}")
    return [pickle.loads(collected[rank]) for rank in range(world_size)]


def already_launched() -> bool:
    """True when running under torchrun/Ray with the distributed environment already set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def run_distributed(function: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run in-process if already launched with the right world size, else :func:`spawn`."""
    if already_launched():
        launched_size = int(os.environ["WORLD_SIZE"])
        if launched_size != world_size:
            raise DistributedLaunchError(
                f"launched with WORLD_SIZE={launched_size} but this job needs {world_size}"
            )
        return [function(*args)]
    return spawn(function, world_size, *args)
