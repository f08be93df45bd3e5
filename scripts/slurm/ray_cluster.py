"""Helpers of the Slurm + Ray launcher (``scripts/slurm/ray_job.sbatch``, ``ray_node.sh``).

Subcommands, each printing one line a shell script reads (or an error on stderr and exit 1):

* ``netif [--ifname NAME]``: ``<interface> <ipv4>``: NAME, or the interface of the default route
  (the first non-loopback interface with an IPv4 address when there is none), and its address.
* ``object-store [--bytes N]``: the Ray object store size to ask for: N when given (an error when
  /dev/shm cannot hold it), otherwise 30% of the available memory capped at 90% of the free space
  in /dev/shm (Ray would otherwise fall back to a slow disk-backed store, or fail when it fills).
* ``wait --address H:P --nodes N [--gpus G] [--timeout S] [--watch PID ...]``: waits until the Ray
  cluster has N alive nodes and at least G GPUs; fails as soon as a watched process (the head's
  ``ray start``, the workers' ``srun``) has ended, or when the timeout passes. Prints the nodes.
* ``tagged [--var NAME] --tag VALUE``: PIDs of the processes whose environment holds
  ``NAME=VALUE`` (default NAME: MRLHF_RAY_CLUSTER; everything the launcher starts inherits it, and
  MRLHF_RAY_NODE per Ray node), except this process and its ancestors: the launcher ends these by PID at teardown, never by name.

Guarantees: reads /proc and /sys only; the ``wait`` subcommand connects to the cluster as a
short-lived Ray driver and disconnects. Not guaranteed: GPU counts on heterogeneous nodes (the
expected total is given by the caller).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import socket
import struct
import sys
import time

SIOCGIFADDR = 0x8915


def interface_ipv4(name: str) -> str | None:
    """IPv4 address of interface ``name`` (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def default_route_interface() -> str | None:
    try:
        with open("/proc/net/route") as routes:
            next(routes)
            for line in routes:
                fields = line.split()
                if len(fields) > 1 and fields[1] == "00000000":
                    return fields[0]
    except OSError:
        pass
    return None


def cmd_netif(args: argparse.Namespace) -> int:
    if args.ifname:
        name = args.ifname.split(",")[0].lstrip("=")
        if name.startswith("^"):
            sys.exit(f"ray_cluster: interface '{args.ifname}' is an exclusion list; name the interface to use")
        address = interface_ipv4(name)
        if address is None:
            names = ", ".join(n for _, n in socket.if_nameindex())
            sys.exit(f"ray_cluster: interface '{name}' (NCCL_SOCKET_IFNAME/MRLHF_IFNAME) has no IPv4 "
                     f"address on {socket.gethostname()}; interfaces here: {names}")
        print(name, address)
        return 0
    candidates = [default_route_interface()] + [n for _, n in socket.if_nameindex()]
    for name in candidates:
        if name and name != "lo":
            address = interface_ipv4(name)
            if address:
                print(name, address)
                return 0
    print("lo", "127.0.0.1")
    return 0


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def cmd_object_store(args: argparse.Namespace) -> int:
    shm_free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    if args.bytes:
        if args.bytes > shm_free:
            sys.exit(f"ray_cluster: MRLHF_RAY_OBJECT_STORE_BYTES={args.bytes} is more than /dev/shm holds "
                     f"({shm_free} bytes free on {socket.gethostname()}); lower it or enlarge /dev/shm")
        print(args.bytes)
        return 0
    wanted = int(available_memory_bytes() * 0.3)
    cap = int(shm_free * 0.9)
    if wanted > cap:
        print(f"ray_cluster: /dev/shm has {shm_free} bytes free, less than Ray's default object store "
              f"({wanted}); using {cap}", file=sys.stderr)
    size = min(wanted, cap)
    if size < 78 * 1024**2:  # Ray's own minimum object store size
        sys.exit(f"ray_cluster: /dev/shm on {socket.gethostname()} has only {shm_free} bytes free; Ray's "
                 "object store needs at least 78 MiB there")
    print(size)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    import ray

    deadline = time.monotonic() + args.timeout

    def check_watched() -> None:
        for pid in args.watch:  # children of the calling script: alive while /proc has them, unreaped
            if _zombie(pid):
                sys.exit(f"ray_cluster: process {pid} (Ray head or worker step) ended before the cluster "
                         "was complete; see the logs of this restart")

    while True:  # the GCS port first: ray.init would retry for a long time on a dead head
        check_watched()
        host, port = args.address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"ray_cluster: the Ray head at {args.address} did not open its port in {args.timeout} s")
            time.sleep(1)
    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    try:
        while True:
            check_watched()
            nodes = [node for node in ray.nodes() if node.get("Alive")]
            gpus = sum(node.get("Resources", {}).get("GPU", 0) for node in nodes)
            if len(nodes) >= args.nodes and gpus >= args.gpus:
                for node in nodes:
                    resources = node.get("Resources", {})
                    print(f"node {node['NodeManagerAddress']}:{node['NodeManagerPort']} "
                          f"cpus={resources.get('CPU', 0):g} gpus={resources.get('GPU', 0):g}")
                return 0
            if time.monotonic() > deadline:
                sys.exit(f"ray_cluster: after {args.timeout} s the cluster has {len(nodes)}/{args.nodes} nodes "
                         f"and {gpus:g}/{args.gpus} GPUs (raise MRLHF_RAY_JOIN_TIMEOUT, or see the worker logs)")
            time.sleep(1)
    finally:
        ray.shutdown()


def _zombie(pid: int) -> bool:
    """True when ``pid`` has ended (gone, or a zombie not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def ancestors(pid: int) -> set[int]:
    found = {pid}
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        found.add(pid)
    return found


def cmd_tagged(args: argparse.Namespace) -> int:
    marker = f"{args.var}={args.tag}".encode()
    skip = ancestors(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if marker in environ.read().split(b"\0") and not _zombie(int(entry)):
                    print(entry)
        except OSError:
            continue
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ray_cluster.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    netif = sub.add_parser("netif")
    netif.add_argument("--ifname", default="")
    store = sub.add_parser("object-store")
    store.add_argument("--bytes", type=int, default=0)
    wait = sub.add_parser("wait")
    wait.add_argument("--address", required=True)
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--gpus", type=int, default=0)
    wait.add_argument("--timeout", type=float, default=300.0)
    wait.add_argument("--watch", type=int, nargs="*", default=[])
    tagged = sub.add_parser("tagged")
    tagged.add_argument("--tag", required=True)
    tagged.add_argument("--var", default="MRLHF_RAY_CLUSTER")
    args = parser.parse_args(argv)
    return {"netif": cmd_netif, "object-store": cmd_object_store, "wait": cmd_wait, "tagged": cmd_tagged}[
        args.command](args)


if __name__ == "__main__":
    sys.exit(main())
