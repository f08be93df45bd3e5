"""Math answer equivalence with math-verify, inside the sandbox (model text reaches sympy only here).

Runs as ``python -I -B math_worker.py SITE_PACKAGES TIMEOUT_SECONDS``: imports math-verify from the
read-only bound site-packages, prints ``{"ready": true}`` (or ``{"ready": false, "error": ...}``),
then answers one JSON line per request, ``{"gold": str, "answer": str}`` ->
``{"equal": bool, "gold": str, "answer": str}`` (the parsed forms, for the verdict detail).

math-verify's own signal-based timeouts work here because this is the worker's main thread; the
hard per-request limit is the parent's, which kills the whole sandbox when a request overruns.
Standard library only apart from math-verify and its dependencies.
"""

import json
import os
import sys
import traceback


def _normalise_text(text):
    return "".join(text.split()).strip("$").lower()


def main():
    site_packages, timeout_seconds = sys.argv[1], int(sys.argv[2])
    protocol_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)  # math-verify logs timeouts; nobody reads them, and a full pipe would block

    def send(message):
        os.write(protocol_out, json.dumps(message).encode() + b"\n")

    sys.path.append(site_packages)
    try:
        from math_verify import parse, verify
    except BaseException:
        send({"ready": False, "error": traceback.format_exc()[-2000:]})
        return
    send({"ready": True})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            gold = parse("\\boxed{" + request["gold"] + "}", parsing_timeout=timeout_seconds)
        except BaseException as error:  # the reference itself is unreadable: a data error
            send({"gold_error": f"{type(error).__name__}: {error}"[:500]})
            continue
        try:
            answer = parse("\\boxed{" + request["answer"] + "}", parsing_timeout=timeout_seconds)
            if gold and answer:
                equal = bool(verify(gold, answer, timeout_seconds=timeout_seconds))
            else:  # not mathematics math-verify can read: compare the text
                equal = _normalise_text(request["gold"]) == _normalise_text(request["answer"])
        except BaseException as error:  # an answer math-verify chokes on is not a correct one
            send({"equal": False, "answer_error": f"{type(error).__name__}: {error}"[:500]})
            continue
        send({"equal": equal, "gold": str(gold[:1])[:200], "answer": str(answer[:1])[:200]})


if __name__ == "__main__":
    main()
