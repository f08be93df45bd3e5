"""Scripts that run *inside* the sandbox (standard library only; never imported by the trainer to
run untrusted code). They are modules only so that the parent can read their source and tests can
exercise the value codec.

- ``value_codec``: plain-value wire format between the two sandboxed processes.
- ``check_harness``: the trusted test process (holds the tests and the per-execution nonce).
- ``candidate_runner``: the untrusted process that loads the candidate's code and answers calls.
"""
