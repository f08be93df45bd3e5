"""The test process: runs the trusted tests against a candidate living in another process.

Runs inside the sandbox as ``python -I -B check_harness.py``. It reads its request (the tests, the
names they need from the candidate, the entry point, and a random nonce) from stdin, which only
the trusted parent holds, and never writes the tests or the nonce anywhere. It then

1. makes itself non-dumpable, so that no other process of the same uid can read its memory or
   its file descriptors through /proc or ptrace (the seccomp filter also denies ptrace,
   process_vm_readv and pidfd_getfd);
2. starts the candidate runner as a separate process whose stdin/stdout are two private pipes;
3. runs the tests here, with every name they take from the candidate bound to a proxy: a call
   sends the (encoded) arguments to the runner and returns a value *decoded into fresh built-in
   objects*; the candidate's objects, its monkey-patches and its exits stay in its own process;
4. writes ``{"result": "passed", "nonce": ...}`` on its stdout only after the tests returned.

Why the candidate cannot forge a pass: it has no descriptor of this process's stdout and cannot
read the nonce (not in its process, not in a file, not readable via /proc); exit(0) or os._exit
in the candidate only ends the runner, which this process reports as a failure; patching
``check``, ``AssertionError``, ``sys.exit`` or ``print`` changes the runner's interpreter, not
this one; an object with ``__eq__`` always True arrives here as an opaque value equal to nothing.
What it can still do: compute the right answers (that is the point), crash or stall (a failure
or time limit), or read the arguments the tests pass it.

Standard library only: this file runs inside the sandbox.
"""

import builtins
import ctypes
import json
import os
import subprocess
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import value_codec  # noqa: E402

PR_SET_DUMPABLE = 4
MAX_REPLY_BYTES = 16 * 1024 * 1024


class CandidateRaised(Exception):
    """Marks exceptions re-raised here on behalf of the candidate."""


class CandidateGone(BaseException):
    """The runner process ended or spoke nonsense. A BaseException, so that tests catching
    ``Exception`` around a call do not swallow it; a test that swallows it anyway still fails
    (see ``Runner.gone``)."""


def _make_undumpable():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


class Runner:
    def __init__(self, python, runner_path, candidate_path):
        self.process = subprocess.Popen(
            [python, "-I", "-B", runner_path, candidate_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )

    gone = None

    def exchange(self, message):
        if self.gone is not None:
            raise CandidateGone(self.gone)
        try:
            return self._exchange(message)
        except CandidateGone as error:
            self.gone = str(error)
            raise

    def _exchange(self, message):
        try:
            self.process.stdin.write(value_codec.dumps_message(message))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise CandidateGone(self._exit_description()) from None
        line = self.process.stdout.readline(MAX_REPLY_BYTES)
        if not line.endswith(b"\n"):
            raise CandidateGone(self._exit_description())
        try:
            return value_codec.loads_message(line)
        except value_codec.CodecError as error:
            raise CandidateGone(f"candidate sent an unreadable reply: {error}") from None

    def _exit_description(self):
        try:
            status = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "candidate process stopped answering"
        status = 128 - status if status < 0 else status  # shell form: 152 is SIGXCPU (CPU limit)
        return f"candidate process exited with status {status}"

    def proxy(self, name):
        def call_candidate(*args, **kwargs):
            reply = self.exchange({
                "call": name,
                "args": value_codec.encode(list(args)),
                "kwargs": [[key, value_codec.encode(value)] for key, value in kwargs.items()],
            })
            if "value" in reply:
                try:
                    return value_codec.decode(reply["value"])
                except value_codec.CodecError as error:
                    raise CandidateGone(f"candidate sent an invalid value: {error}") from None
            raise _candidate_exception(str(reply.get("raised", "Exception")), reply.get("message", ""))

        call_candidate.__name__ = name
        return call_candidate


def _candidate_exception(type_name, message):
    """An exception of the candidate's built-in type (so tests may catch it), marked as the candidate's."""
    base = getattr(builtins, type_name, None)
    if not (isinstance(base, type) and issubclass(base, Exception)) or base is CandidateRaised:
        base = Exception
    marked = type(type_name, (base, CandidateRaised), {})
    try:
        return marked(str(message)[:1000])
    except Exception:
        return CandidateRaised(f"{type_name}: {message}"[:1000])


def run_tests(request, report):
    runner = Runner(sys.executable, request["runner"], request["candidate"])
    reply = runner.exchange({"names": request["names"]})
    if "load_error" in reply:
        return report("candidate_error", "loading the candidate failed: " + str(reply["load_error"]))
    namespace = {"__name__": "__check__", "__builtins__": builtins}
    descriptions = reply.get("names")
    if type(descriptions) is not dict:
        raise CandidateGone("candidate sent no name table")
    for name in request["names"]:
        description = descriptions.get(name)
        kind = description.get("kind") if type(description) is dict else None
        if kind == "callable":
            namespace[name] = runner.proxy(name)
        elif kind == "value":
            namespace[name] = value_codec.decode(description.get("value"))
    exec(compile(request["test"], "test.py", "exec"), namespace)
    entry_point = request.get("entry_point")
    if entry_point:
        if entry_point not in namespace:
            return report("candidate_error", f"the candidate does not define {entry_point!r}")
        namespace["check"](namespace[entry_point])
    if runner.gone is not None:  # the tests swallowed the runner's end: still a failure
        raise CandidateGone(runner.gone)
    return None


def main():
    _make_undumpable()
    request = json.loads(sys.stdin.buffer.read())
    report_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # prints from the tests must not reach the report channel

    def report(kind, detail="", **extra):
        message = {"result": kind, "detail": str(detail)[-2000:], **extra}
        os.write(report_fd, value_codec.dumps_message(message))
        return kind

    try:
        failure = run_tests(request, report)
    except CandidateGone as error:
        report("candidate_died", str(error))
    except CandidateRaised as error:
        kind = type(error).__mro__[1].__name__
        report("candidate_error", f"{type(error).__name__}: {error}", exception=kind)
    except BaseException as error:  # AssertionError, or the candidate's answer broke the tests
        report("wrong_answer", _where(error, request["test"]))
    else:
        if failure is None:
            report("passed", nonce=request["nonce"])


def _where(error, test_code):
    """'test line N: <source line>; <exception>' for the innermost frame in the test code."""
    source = test_code.splitlines()
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == "test.py"]
    lines = [
        f"test line {frame.lineno}: {source[frame.lineno - 1].strip()[:300]}"
        for frame in frames[-1:] if frame.lineno and 0 < frame.lineno <= len(source)
    ]
    return "; ".join(lines + [f"{type(error).__name__}: {error}"[:500]])


if __name__ == "__main__":
    main()
