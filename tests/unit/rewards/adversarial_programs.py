"""The adversarial programs run by test_sandbox_adversarial.py, grouped by what they attack.

Each program prints ``ESCAPED:<what>`` if an attack it tries succeeds; the suite asserts that no
output contains ESCAPED, that the verdict is one of the expected ones, and that the host shows no
trace (files, processes, connections, killed processes). The placeholders ``{token}``, ``{port}``,
``{sentinel_pid}``, ``{sentinel_file}``, ``{abstract_socket}`` and ``{secret_name}`` are replaced
(plain text replacement) by the suite.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rlhf.rewards.sample import Verdict

OK, RE, TLE, MLE, OLE = (Verdict.OK, Verdict.RUNTIME_ERROR, Verdict.TIME_LIMIT,
                         Verdict.MEMORY_LIMIT, Verdict.OUTPUT_LIMIT)
KILLED = {TLE, RE, MLE}

TRY = """
import platform
X86_64 = platform.machine() == "x86_64"  # the raw syscall numbers below are x86-64 ones

def attempt(what, action):
    try:
        action()
    except BaseException:
        return
    print("ESCAPED:" + what, flush=True)
"""


@dataclass(frozen=True)
class Program:
    name: str
    code: str
    verdicts: frozenset
    slow: bool = False
    """Runs into the (short) wall-clock limit on purpose."""
    wall_seconds: float | None = None
    """A longer wall-clock limit for programs that must reach another limit first (memory)."""


def _p(name: str, code: str, verdicts, slow: bool = False, wall_seconds: float | None = None) -> Program:
    verdicts = frozenset(verdicts if isinstance(verdicts, (set, frozenset)) else {verdicts})
    return Program(name, TRY + code, verdicts, slow, wall_seconds)


FORK_BOMBS = [
    _p("fork_bomb_loop", "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", KILLED, slow=True),
    _p("fork_bomb_count", "import os, sys\nn = 0\nwhile True:\n    try: pid = os.fork()\n    except OSError: break\n"
       "    if pid == 0:\n        import time; time.sleep(30); os._exit(0)\n    n += 1\nprint('forked', n)\n"
       "if n >= 64: print('ESCAPED:process-limit')", {OK}),
    _p("thread_bomb", "import threading, time\nn = 0\ntry:\n    while True:\n        threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); n += 1\n"
       "except RuntimeError: pass\nprint('threads', n)\nif n >= 64: print('ESCAPED:thread-limit')", {OK}),
    _p("subprocess_bomb", "import subprocess, sys\nprocs = []\ntry:\n    while True:\n        procs.append(subprocess.Popen(['/bin/sleep', '30']))\n"
       "except OSError: pass\nprint('spawned', len(procs))\nif len(procs) >= 64: print('ESCAPED:spawn-limit')", {OK}),
    _p("shell_fork_bomb", "import os\nos.execv('/bin/bash', ['bash', '-c', ':(){ :|:& };:; sleep 30'])", KILLED, slow=True),
    _p("double_fork_orphan", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
       "        time.sleep(600)\n    os._exit(0)\ntime.sleep(0.2)\nprint('parent done')", {OK}),
    _p("orphan_ignoring_sighup", "import os, signal, time\nif os.fork() == 0:\n    signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
       "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    os.setsid()\n    time.sleep(600)\ntime.sleep(0.1)", {OK}),
    _p("orphan_busy_loop", "import os\nif os.fork() == 0:\n    os.setsid()\n    while True: pass\nprint('left a spinner')", {OK}),
    _p("daemon_via_shell", "import subprocess\nsubprocess.Popen(['/bin/sh', '-c', 'nohup sleep 600 >/dev/null 2>&1 &'])\nprint('daemonised')", {OK}),
    _p("reparent_chain", "import os, time\nfor _ in range(5):\n    if os.fork() != 0:\n        os._exit(0)\n    os.setsid()\ntime.sleep(600)", {OK, TLE}),
]

MEMORY = [
    _p("bytearray_balloon", "x = bytearray(4 * 1024**3)", {MLE}, wall_seconds=20.0),
    _p("list_balloon", "x = []\nwhile True: x.append(' ' * 10**6)", {MLE}, wall_seconds=20.0),
    _p("string_doubling", "s = 'x'\nwhile True: s = s + s", {MLE}, wall_seconds=20.0),
    _p("mmap_balloon", "import mmap\nm = mmap.mmap(-1, 8 * 1024**3)\nm.write(b'x' * 10**6)", {MLE, RE}, wall_seconds=20.0),
    _p("child_balloon", "import os, sys\npid = os.fork()\nif pid == 0:\n    x = bytearray(4 * 1024**3)\n    os._exit(0)\n"
       "_, status = os.waitpid(pid, 0)\nsys.exit(1 if status else 0)", {MLE, RE}, wall_seconds=20.0),
    _p("many_children_balloon", "import os\nfor _ in range(8):\n    if os.fork() == 0:\n        x = bytearray(300 * 1024**2)\n"
       "        import time; time.sleep(5); os._exit(0)\nimport time; time.sleep(5)\nraise SystemExit(0)", {MLE, RE, TLE, OK}, slow=True),
    _p("touch_pages_balloon", "chunks = []\nwhile True:\n    b = bytearray(64 * 1024**2)\n    for i in range(0, len(b), 4096): b[i] = 1\n    chunks.append(b)", {MLE}, wall_seconds=20.0),
    _p("recursion_bomb", "import sys\nsys.setrecursionlimit(10**8)\ndef f(n): return f(n + 1) + 1\nf(0)", {RE, MLE, TLE}, wall_seconds=20.0),
]

CPU_AND_SLEEP = [
    _p("spin", "while True: pass", {TLE}, slow=True),
    _p("spin_ignoring_sigxcpu", "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass", {TLE}, slow=True),
    _p("spin_in_thread", "import threading\ndef spin():\n    while True: pass\nthreading.Thread(target=spin).start()", {TLE}, slow=True),
    _p("spin_in_children", "import os\nfor _ in range(4):\n    if os.fork() == 0:\n        while True: pass\nwhile True: pass", {TLE}, slow=True),
    _p("sleep", "import time\ntime.sleep(600)", {TLE}, slow=True),
    _p("pause", "import signal\nsignal.pause()", {TLE}, slow=True),
    _p("select_forever", "import select\nselect.select([], [], [])", {TLE}, slow=True),
    _p("read_stdin_eof", "import sys\ndata = sys.stdin.read()\nprint('eof', len(data))", {OK}),
    _p("close_output_then_spin", "import os\nos.close(1); os.close(2)\nwhile True: pass", {TLE}, slow=True),
    _p("busy_exit_code_forgery", "raise SystemExit(152)", {TLE, RE}),
]

DISK = [
    _p("fill_workdir", "with open('big', 'wb') as f:\n    while True: f.write(b'x' * 10**6)", {RE, MLE}),
    _p("file_size_limit", "import os\nfd = os.open('one', os.O_WRONLY | os.O_CREAT)\nos.pwrite(fd, b'x', 10**9)", {RE}),
    _p("many_small_files", "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 4096); i += 1", {RE, MLE, TLE}),
    _p("fill_tmpdir_env", "import os, tempfile\nwith tempfile.NamedTemporaryFile(dir=os.environ.get('TMPDIR')) as f:\n"
       "    while True: f.write(b'x' * 10**6)", {RE, MLE}),
    _p("fill_dev_shm", "attempt('dev-shm', lambda: open('/dev/shm/x{token}', 'wb').write(b'x'))", {OK}),
]

OUTSIDE_WRITES = [
    _p(f"write_{label}", f"attempt('write-{label}', lambda: open({path!r}, 'wb').write(b'x'))", {OK})
    for label, path in [
        ("usr", "/usr/escape-{token}"), ("root_dir", "/escape-{token}"), ("etc", "/etc/escape-{token}"),
        ("tmp", "/tmp/escape-{token}"), ("var_tmp", "/var/tmp/escape-{token}"), ("proc", "/proc/escape-{token}"),
        ("dev", "/dev/escape-{token}"), ("host_sentinel", "{sentinel_file}"), ("files_dir", "/.sandbox/files/escape"),
        ("proc_sys", "/proc/sys/kernel/hostname"), ("sysrq", "/proc/sysrq-trigger"), ("proc1_root", "/proc/1/root/escape-{token}"),
        ("dev_mem", "/dev/mem"), ("dev_kmsg", "/dev/kmsg"), ("sys", "/sys/escape-{token}"),
    ]
] + [
    _p("symlink_to_usr", "import os\nos.symlink('/usr/lib/escape-{token}', 'link')\nattempt('symlink', lambda: open('link', 'wb').write(b'x'))", {OK}),
    _p("symlink_to_sentinel", "import os\nos.symlink('{sentinel_file}', 'link2')\nattempt('symlink-sentinel', lambda: open('link2', 'ab').write(b'x'))", {OK}),
    _p("hardlink_system_file", "import os\nattempt('hardlink', lambda: os.link('/usr/bin/python3', 'py'))", {OK}),
    _p("chmod_system_file", "import os\nattempt('chmod', lambda: os.chmod('/usr/bin/python3', 0o777))", {OK}),
    _p("rename_out", "open('x', 'w').write('x')\nimport os\nattempt('rename', lambda: os.rename('x', '/usr/x-{token}'))", {OK}),
    _p("dotdot_escape", "attempt('dotdot', lambda: open('../../../../tmp/escape-{token}', 'wb').write(b'x'))", {OK}),
    _p("proc_self_root", "attempt('proc-self-root', lambda: open('/proc/self/root/usr/escape-{token}', 'wb').write(b'x'))", {OK}),
    _p("mknod_device", "import os, stat\nattempt('mknod', lambda: os.mknod('disk', 0o600 | stat.S_IFBLK, os.makedev(8, 0)))", {OK}),
]

NETWORK = [
    _p("tcp_loopback", "import socket\nattempt('tcp', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=1))", {OK}),
    _p("tcp6_loopback", "import socket\nattempt('tcp6', lambda: socket.create_connection(('::1', {port}), timeout=1))", {OK}),
    _p("udp_send", "import socket\ndef send():\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.sendto(b'x', ('127.0.0.1', {port}))\nattempt('udp', send)", {OK}),
    _p("abstract_unix_socket", "import socket\ndef go():\n    s = socket.socket(socket.AF_UNIX)\n    s.connect('\\0{abstract_socket}')\nattempt('abstract-unix', go)", {OK}),
    _p("netlink_socket", "import socket\nattempt('netlink', lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))", {OK}),
    _p("packet_socket", "import socket\nattempt('packet', lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))", {OK}),
    _p("raw_icmp", "import socket\nattempt('raw', lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))", {OK}),
    _p("socketpair_inet", "import socket\nattempt('socketpair-inet', lambda: socket.socketpair(socket.AF_INET))", {OK}),
    _p("interfaces", "names = [line.split(':')[0].strip() for line in open('/proc/net/dev').read().splitlines()[2:]]\n"
       "print(names)\nif set(names) - {'lo'}: print('ESCAPED:interfaces')", {OK}),
]

PROCESSES = [
    _p("kill_sentinel", "import os, signal\nattempt('kill-sentinel', lambda: os.kill({sentinel_pid}, signal.SIGKILL))", {OK}),
    _p("kill_everything", "import os, signal\nattempt('kill-all', lambda: os.kill(-1, signal.SIGKILL))", {OK, RE}),
    _p("see_host_processes", "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\nprint(pids)\n"
       "if '{sentinel_pid}' in pids or len(pids) > 5: print('ESCAPED:pid-namespace')", {OK}),
    _p("ptrace_attach", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
       "if libc.ptrace(16, 1, 0, 0) == 0: print('ESCAPED:ptrace')", {OK}),
    _p("ptrace_traceme", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.ptrace(0, 0, 0, 0) == 0: print('ESCAPED:traceme')", {OK}),
    _p("process_vm_readv", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
       "if libc.process_vm_readv(1, 0, 0, 0, 0, 0) != -1 or ctypes.get_errno() != 1: print('ESCAPED:vm-readv')", {OK}),
    _p("read_init_mem", "attempt('init-mem', lambda: open('/proc/1/mem', 'rb').read(1))", {OK}),
    _p("setuid_root", "import os\nattempt('setuid', lambda: os.setuid(0))", {OK}),
    _p("unshare_user", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.unshare(0x10000000) == 0: print('ESCAPED:unshare')", {OK}),
    _p("mount_tmpfs", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
       "if libc.mount(b'none', b'/.sandbox/work', b'tmpfs', 0, None) == 0: print('ESCAPED:mount')", {OK}),
    _p("bpf_syscall", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nif X86_64 and libc.syscall(321, 0, 0, 0) >= 0: print('ESCAPED:bpf')", {OK}),
    _p("keyctl", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nif X86_64 and libc.syscall(250, 0, 0, 0) >= 0: print('ESCAPED:keyctl')", {OK}),
    _p("io_uring", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nif X86_64 and libc.syscall(425, 1, 0) >= 0: print('ESCAPED:io_uring')", {OK}),
    _p("chroot", "import os\nattempt('chroot', lambda: os.chroot('/usr'))", {OK}),
    _p("sethostname", "import socket\nattempt('hostname', lambda: socket.sethostname('pwned'))", {OK}),
]

LIMITS_AND_ENVIRONMENT = [
    _p(f"raise_{name}", f"import resource\nsoft, hard = resource.getrlimit(resource.{name})\n"
       f"attempt('raise-{name}', lambda: resource.setrlimit(resource.{name}, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)))", {OK})
    for name in ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")
] + [
    _p("cgroup_escape", "attempt('cgroup', lambda: open('/sys/fs/cgroup/cgroup.procs', 'w').write('1'))", {OK}),
    _p("prlimit_other", "import resource\nattempt('prlimit-1', lambda: resource.prlimit(1, resource.RLIMIT_NPROC, (10**6, 10**6)))", {OK}),
    _p("read_secret_env", "import os\nif '{secret_name}' in os.environ or any('{secret_name}' in open(f'/proc/{p}/environ', errors='replace').read()"
       " for p in os.listdir('/proc') if p.isdigit()): print('ESCAPED:environment')\nprint(sorted(os.environ))", {OK}),
    _p("read_host_files", "import os\nfor path in ['/etc/passwd', '/etc/shadow', '/root', '/home', '/work', '/var/log', '/sys/kernel']:\n"
       "    if os.path.exists(path): print('ESCAPED:visible:' + path)", {OK}),
    _p("read_trainer_source", "import os\nif os.path.exists('{sentinel_file}'): print('ESCAPED:host-tmp-visible')", {OK}),
    _p("environ_is_scrubbed", "import os\nextra = set(os.environ) - {'PATH', 'HOME', 'TMPDIR', 'LC_ALL', 'PWD', 'MEGATRON_RLHF_SANDBOX', 'SHLVL', '_'}\n"
       "if extra: print('ESCAPED:env:' + ','.join(sorted(extra)))", {OK}),
    _p("inherited_fds", "import os\nextra = [fd for fd in os.listdir('/proc/self/fd') if int(fd) > 3]\nif extra: print('ESCAPED:fds:' + ','.join(extra))", {OK}),
    _p("uid_not_root", "import os\nif os.getuid() == 0 or os.geteuid() == 0: print('ESCAPED:root')", {OK}),
    _p("no_capabilities", "caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0]\n"
       "if int(caps.split()[1], 16) != 0: print('ESCAPED:caps')", {OK}),
    _p("seccomp_on", "mode = [l for l in open('/proc/self/status') if l.startswith('Seccomp:')][0]\nif mode.split()[1] != '2': print('ESCAPED:no-seccomp')", {OK}),
    _p("no_new_privs", "flag = [l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0]\nif flag.split()[1] != '1': print('ESCAPED:new-privs')", {OK}),
]

OUTPUT = [
    _p("huge_stdout", "import sys\nwhile True: sys.stdout.write('x' * 65536)", {OLE}),
    _p("huge_stderr", "import sys\nwhile True: sys.stderr.write('y' * 65536)", {OLE}),
    _p("huge_single_line", "print('z' * (50 * 1024 * 1024))", {OLE, MLE}),
    _p("child_floods_output", "import os\nif os.fork() == 0:\n    while True: os.write(1, b'c' * 65536)\nimport time; time.sleep(30)", {OLE}),
    _p("binary_garbage", "import os\nos.write(1, bytes(range(256)) * 100)", {OK}),
]

CRASHES = [
    _p("segfault", "import ctypes\nctypes.string_at(0)", {RE}),
    _p("abort", "import os\nos.abort()", {RE}),
    _p("exception", "raise ValueError('boom')", {RE}),
    _p("exit_3", "raise SystemExit(3)", {RE}),
    _p("kill_self", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", {RE, TLE, OK}),  # init of its namespace: may ignore it
    _p("syntax_error", "def f(:\n    pass", {RE}),
    _p("deep_nesting_source", "x = " + "(" * 5000 + ")" * 5000, {RE}),
    _p("fake_bwrap_failure", "import sys\nprint('bwrap: Creating new namespace failed', file=sys.stderr)\nraise SystemExit(1)", {RE}),
]

ALL_PROGRAMS = (FORK_BOMBS + MEMORY + CPU_AND_SLEEP + DISK + OUTSIDE_WRITES + NETWORK + PROCESSES
                + LIMITS_AND_ENVIRONMENT + OUTPUT + CRASHES)
