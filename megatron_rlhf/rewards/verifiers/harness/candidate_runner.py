"""The untrusted process: load the candidate's code, then answer calls from the test process.

Runs inside the sandbox as ``python -I -B candidate_runner.py CANDIDATE_FILE``, started by the
check harness with two pipes as stdin/stdout. Everything here can be subverted by the candidate's
code, which runs in this interpreter; nothing here is trusted. The protocol pipes are moved off
fds 0/1 before the candidate runs, so its prints go to /dev/null rather than into the protocol.

Protocol (one JSON object per line, see value_codec):
  test -> runner  {"names": [...]}            runner -> test  {"names": {name: description}}
                                                               or {"load_error": "..."}
  test -> runner  {"call": name, "args": [...], "kwargs": [[k, v], ...]}
                                               runner -> test  {"value": <encoded>}
                                                               or {"raised": type, "message": str}
"""

import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import value_codec  # noqa: E402


def _take_protocol_pipes():
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return proto_in, proto_out


def _describe(namespace, name):
    if name not in namespace:
        return {"kind": "missing"}
    value = namespace[name]
    if callable(value):
        return {"kind": "callable"}
    try:
        return {"kind": "value", "value": value_codec.encode(value)}
    except (value_codec.CodecError, RecursionError):
        return {"kind": "value", "value": {"opaque": type(value).__name__}}


def main():
    candidate_path = sys.argv[1]
    proto_in, proto_out = _take_protocol_pipes()

    def send(message):
        proto_out.write(value_codec.dumps_message(message))
        proto_out.flush()

    request = value_codec.loads_message(proto_in.readline())
    namespace = {"__name__": "candidate", "__builtins__": __builtins__}
    try:
        with open(candidate_path, "rb") as handle:
            source = handle.read()
        exec(compile(source, "candidate.py", "exec"), namespace)
    except BaseException as error:  # SystemExit too: exiting while loading is a failure
        send({"load_error": "".join(traceback.format_exception_only(type(error), error))[-2000:]})
        return
    send({"names": {name: _describe(namespace, name) for name in request.get("names", [])}})
    while True:
        line = proto_in.readline()
        if not line:
            return
        call = value_codec.loads_message(line)
        try:
            function = namespace[call["call"]]
            args = value_codec.decode(call["args"])
            kwargs = {key: value_codec.decode(value) for key, value in call["kwargs"]}
            result = function(*args, **kwargs)
            reply = {"value": value_codec.encode(result)}
        except BaseException as error:  # the candidate's exception is reported, not fatal
            reply = {
                "raised": type(error).__name__,
                "message": str(error)[:1000] if not isinstance(error, RecursionError) else "",
            }
        try:
            send(reply)
        except (value_codec.CodecError, ValueError, RecursionError):
            send({"raised": "CodecError", "message": "result cannot be sent"})


if __name__ == "__main__":
    main()
