"""The seccomp filter loaded into every sandboxed process (a deny list, compiled with libseccomp).

Defence in depth on top of the namespaces: the calls below fail with EPERM (or ENOSYS for clone3,
so that the C library falls back to clone) instead of reaching kernel code that the sandbox has no
business using. Everything else is allowed: the filter is not the only wall, the user namespace
without capabilities, the read-only mounts and the rlimits/cgroup are.

Denied: tracing and reading other processes' memory (ptrace, process_vm_*, pidfd_getfd, kcmp),
new namespaces and mounts (unshare, setns, mount, umount2, pivot_root, the new mount API, chroot),
kernel modules, kexec, reboot, swap, accounting, clock changes, keyrings, BPF, perf events,
userfaultfd, io_uring, fanotify, handles by inode (open_by_handle_at), personality changes, and
sockets of any family except AF_UNIX (the network namespace has no interfaces but loopback anyway).

Built with the ``pyseccomp`` ctypes binding of the system's libseccomp (Debian ``libseccomp2``).
"""

from __future__ import annotations

import errno
import functools
import io
import socket

DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "add_key", "request_key", "keyctl", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "fanotify_init",
    "open_by_handle_at", "name_to_handle_at", "personality", "syslog", "quotactl",
    "lookup_dcookie", "vhangup", "iopl", "ioperm",
)
"""System calls that fail with EPERM inside the sandbox."""


class SeccompUnavailable(RuntimeError):
    """libseccomp (or its Python binding) is missing."""


@functools.lru_cache(maxsize=1)
def seccomp_filter_bpf() -> bytes:
    """The compiled BPF program, in the form ``bwrap --seccomp FD`` reads."""
    try:
        import pyseccomp
    except (ImportError, OSError) as error:  # OSError: libseccomp.so not found by ctypes
        raise SeccompUnavailable(
            f"cannot load libseccomp through pyseccomp ({error}); install the Debian package "
            "libseccomp2 and the PyPI package pyseccomp (scripts/bootstrap_env.sh does both)"
        ) from error
    syscall_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
        if number < 0:
            continue  # a call this architecture does not have (iopl on arm64, ...)
        syscall_filter.add_rule(pyseccomp.ERRNO(errno.EPERM), number)
    syscall_filter.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    # socket(family, ...) and socketpair: every family but AF_UNIX is refused.
    for call in ("socket", "socketpair"):
        syscall_filter.add_rule(
            pyseccomp.ERRNO(errno.EACCES), call, pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX)
        )
    buffer = _FilenoBuffer()
    syscall_filter.export_bpf(buffer)
    return buffer.read_all()


class _FilenoBuffer:
    """pyseccomp's export_bpf writes to a file descriptor: give it a memfd and read it back."""

    def __init__(self) -> None:
        import os

        self._os = os
        self._fd = os.memfd_create("megatron-rlhf-seccomp", os.MFD_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def read_all(self) -> bytes:
        os = self._os
        try:
            os.lseek(self._fd, 0, io.SEEK_SET)
            chunks = []
            while chunk := os.read(self._fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(self._fd)
