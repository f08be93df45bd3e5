"""HumanEval, MBPP and LiveCodeBench loaders (graded by the code verifier in the sandbox).

- HumanEval: function completion; the ground truth is the record's ``test`` (defining
  ``check(candidate)``) and ``entry_point``. Chat runs ask for the whole function in a fenced
  block (the prompt's code is inside the question, so the verifier can add its imports and
  helpers); completion runs feed the raw ``prompt`` and grade ``prompt + completion``.
- MBPP (full: ``text``, ``test_setup_code``; sanitized: ``prompt``, ``test_imports``): the asserts of
  ``test_list`` name the function, as in the paper's prompt.
- LiveCodeBench (code generation): stdin/stdout problems; public and private test cases, the
  private ones either JSON or LiveCodeBench's compressed form (base64 of zlib of a pickled JSON
  string; unpickled with every global refused, so only plain strings can come out). Problems with
  function-call tests (LeetCode style) are skipped and counted.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from pathlib import Path
from typing import Any

from megatron_rlhf.evaluation.ability.items import EvalItem, LoadedTask, field_of, read_records

FUNCTION_INSTRUCTION = "Complete the following Python function. Answer with the whole function in a ```python code block."
MBPP_INSTRUCTION = "Answer with the Python code in a ```python code block."
STDIO_INSTRUCTION = ("Write a Python program that reads the input from stdin and writes the answer to stdout. "
                     "Answer with the program in a ```python code block.")


def load_humaneval(path: Path, task: str) -> LoadedTask:
    loaded = LoadedTask([])
    for where, record in read_records(path):
        prompt = field_of(record, ("prompt",), where)
        truth = {"test": field_of(record, ("test",), where), "entry_point": field_of(record, ("entry_point",), where)}
        item_id = field_of(record, ("task_id",), where)
        chat = f"{FUNCTION_INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```"
        loaded.items.append(EvalItem(item_id, task, "code", chat, truth, completion_prompt=prompt, source=where))
    return loaded


def load_mbpp(path: Path, task: str) -> LoadedTask:
    loaded = LoadedTask([])
    for number, (where, record) in enumerate(read_records(path)):
        text = field_of(record, ("text", "prompt"), where)
        tests = field_of(record, ("test_list",), where, list)
        if not tests or not all(isinstance(test, str) and test.strip() for test in tests):
            raise ValueError(f"{where}: 'test_list' must be a non-empty list of assert statements")
        imports = record.get("test_imports") or []
        setup = record.get("test_setup_code") or "\n".join(imports)
        if not isinstance(setup, str):
            raise ValueError(f"{where}: 'test_setup_code'/'test_imports' must be code, got {setup!r:.80}")
        listed = "\n".join(tests)
        prompt = f"{text.strip()}\nYour code should pass these tests:\n\n{listed}\n\n{MBPP_INSTRUCTION}"
        item_id = str(record.get("task_id", f"{task}:{number}"))
        loaded.items.append(EvalItem(item_id, task, "code", prompt, {"asserts": tests, "setup": setup}, source=where))
    return loaded


def load_livecodebench(path: Path, task: str) -> LoadedTask:
    loaded = LoadedTask([])
    for number, (where, record) in enumerate(read_records(path)):
        content = field_of(record, ("question_content",), where)
        cases = _test_cases(record.get("public_test_cases"), f"{where}: public_test_cases")
        cases += _test_cases(record.get("private_test_cases"), f"{where}: private_test_cases")
        if not cases:
            raise ValueError(f"{where}: no test cases in public_test_cases / private_test_cases")
        if any(case.get("testtype", "stdin") != "stdin" for case in cases):
            loaded.skip("function-call tests (only stdin/stdout problems are graded)")
            continue
        io_cases = [[case["input"], case["output"]] for case in cases]
        item_id = str(record.get("question_id") or f"{task}:{number}")
        prompt = f"{content.strip()}\n\n{STDIO_INSTRUCTION}"
        loaded.items.append(EvalItem(item_id, task, "code", prompt, {"io": io_cases}, source=where))
    return loaded


def _test_cases(value: Any, where: str) -> list[dict[str, str]]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = _decode_cases(value, where)
    if not isinstance(value, list) or not all(
        isinstance(case, dict) and isinstance(case.get("input"), str) and isinstance(case.get("output"), str)
        for case in value
    ):
        raise ValueError(f"{where}: expected a list of {{input, output, testtype}} objects")
    return value


def _decode_cases(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        unpickled = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(text, validate=True)))).load()
        return json.loads(unpickled)
    except (ValueError, TypeError, zlib.error, pickle.UnpicklingError, EOFError) as error:
        raise ValueError(f"{where}: neither JSON nor LiveCodeBench's compressed test cases ({error})") from None


class _StringsOnly(pickle.Unpickler):
    """Unpickler that refuses every global (class, function): only builtin values can load."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused global {module}.{name} in compressed test cases")
