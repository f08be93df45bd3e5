"""The local launcher's rendezvous port (parallel/launch.py): chosen where other processes'
sockets do not land, and a job whose port is taken before its rank 0 listens is started again.

Seen in CI: a checkpoint tool's 2-rank job failed with EADDRINUSE because, in the seconds its
ranks took to import torch, another process (the vLLM tier beside it) took the port picked for
its rendezvous. Here a real listening socket takes the first port, and real spawned ranks meet
on the second."""

from __future__ import annotations

import socket

import pytest

from megatron_rlhf.parallel import launch

pytestmark = [pytest.mark.distributed]


def _join_and_report() -> tuple[int, int]:
    import os

    import torch

    torch.distributed.init_process_group("gloo")
    try:
        return torch.distributed.get_rank(), int(os.environ["MASTER_PORT"])
    finally:
        torch.distributed.destroy_process_group()


def test_free_ports_lie_outside_the_ephemeral_and_ray_worker_ranges():
    low, high = launch.RENDEZVOUS_PORTS
    for _ in range(20):
        port = launch.free_port()
        assert low <= port < min(high, launch._ephemeral_start()), port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # really free


def test_a_job_whose_port_was_taken_is_started_again_on_another(monkeypatch):
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    picks = iter([busy, launch.free_port()])
    monkeypatch.setattr(launch, "free_port", lambda: next(picks))
    try:
        results = launch.spawn(_join_and_report, 2)
    finally:
        taken.close()
    assert [rank for rank, _ in results] == [0, 1]
    assert {port for _, port in results} != {busy}  # met on the second port


def test_other_failures_are_not_retried(monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "free_port", lambda: calls.append(1) or 29999)
    def failing(*args):
        raise launch.DistributedLaunchError("rank 0 of 1 failed:\nValueError: bad input")

    monkeypatch.setattr(launch, "_spawn_on", failing)
    with pytest.raises(launch.DistributedLaunchError, match="bad input"):
        launch.spawn(_join_and_report, 1)
    assert len(calls) == 1
    assert launch.rendezvous_port_taken("... port: 29999, useIpv6: false, code: -98, name: EADDRINUSE", 29999)
    assert not launch.rendezvous_port_taken("... port: 29998, useIpv6: false, code: -98, name: EADDRINUSE", 29999)
