"""Sandbox for untrusted (model-written) code: one isolated, limited, throw-away process tree per execution.

What is isolated (each layer is required by default; a missing one makes :class:`Sandbox` refuse
to start unless the config turns it off explicitly):

- **Processes**: a separate process tree started by ``exec``, never the trainer's own process; a
  new PID namespace whose init is the program, so other processes are invisible and cannot be
  signalled or traced, and every descendant dies when the init dies; ``--die-with-parent`` kills
  the sandbox if the trainer dies; for root trainers, a dedicated uid per execution.
- **Privileges**: a new user namespace with no capabilities, ``no_new_privs``, nested user
  namespaces disabled, a seccomp deny list (ptrace, mounts, namespaces, keyrings, BPF, perf,
  io_uring, handle-based opens, non-Unix sockets, ...).
- **File system**: only ``/usr`` (and the interpreter's prefix) mounted, read-only, plus fresh
  ``/proc`` and a read-only minimal ``/dev``; the working directory is a private tmpfs of
  ``scratch_bytes`` that disappears with the mount namespace; nothing of the host's ``/tmp``,
  ``/etc``, ``/home`` or the repository is visible.
- **Network**: a new network namespace (loopback only) and no sockets but AF_UNIX.
- **Environment**: cleared; only PATH, HOME, TMPDIR, LC_ALL and the execution marker are set.
- **Resources**: hard limits the program cannot raise: wall time (parent kill), CPU time
  (RLIMIT_CPU), memory (cgroup + RLIMIT_AS), processes/threads (cgroup pids + RLIMIT_NPROC),
  file size (RLIMIT_FSIZE), disk (tmpfs size), open files (RLIMIT_NOFILE), output (parent cap).
- **Leftovers**: the parent waits for the sandbox's init to exit, empties and removes the cgroup;
  no process, cgroup or file remains.

What is NOT guaranteed:

- Kernel vulnerabilities (a seccomp deny list, not an allow list; the kernel is shared).
- CPU share: there is no CPU quota; an execution may use a whole core until its limits.
- Timing side channels, and reading anything under ``/usr`` (world-readable system files).
- With ``namespaces: false`` (explicit opt-out): no file-system, network or process isolation
  and no seccomp; only rlimits, the process group kill, the cgroup (if on) and a host temporary
  working directory that is removed afterwards; orphaned processes outside the cgroup can survive.
- Without cgroups and without root, the process count is not limited per execution.
- cgroup v2 support follows the kernel's documented interface but is not exercised by this
  project's CI (its machines mount cgroup v1).
"""
