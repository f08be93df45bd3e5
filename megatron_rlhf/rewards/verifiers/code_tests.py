"""Code test specifications (HumanEval/MBPP function tests, stdin/stdout cases) and code extraction.

Ground truth accepted for ``domain: code`` (a JSON object, or a string holding one):

- ``{"test": "<code defining check(candidate)>", "entry_point": "<name>"}``: HumanEval style;
  passes when ``check(<entry_point>)`` returns without error;
- ``{"test": "<code with asserts>"}`` or ``{"asserts": ["assert f(1) == 2", ...], "setup": "..."}``:
  MBPP style, the asserts call the candidate's functions by name;
- ``{"io": [["<stdin>", "<expected stdout>"], ...]}``: the response is a program; each case passes
  when its stdout equals the expected one after normalisation (trailing whitespace of each line and
  trailing blank lines ignored).

Model text is only scanned here (string search for code fences and ``def``), never parsed or
executed; the trusted test code is parsed with :mod:`ast` to find the names it takes from the
candidate.
"""

from __future__ import annotations

import ast
import builtins
import json
import re
from dataclasses import dataclass
from typing import Any

PYTHON_FENCE_TAGS = ("python", "python3", "py", "")


@dataclass(frozen=True)
class FunctionTests:
    test_code: str
    """Trusted test code, run in the test process inside the sandbox."""
    entry_point: str | None
    """Function passed to ``check``; None when the test code calls the candidate by name."""
    candidate_names: tuple[str, ...]
    """Names the test code reads that it does not define: bound to the candidate's objects."""


@dataclass(frozen=True)
class StdioTests:
    cases: tuple[tuple[str, str], ...]
    """(stdin, expected stdout) pairs."""


CodeTests = FunctionTests | StdioTests


def parse_code_ground_truth(ground_truth: Any, where: str) -> CodeTests:
    """Validate ``ground_truth``; raise ValueError naming ``where`` (e.g. 'line 7') on bad input."""
    if isinstance(ground_truth, str):
        try:
            ground_truth = json.loads(ground_truth)
        except ValueError:
            raise ValueError(f"{where}: code ground_truth is a string but not a JSON object") from None
    if not isinstance(ground_truth, dict):
        raise ValueError(
            f"{where}: code ground_truth must be an object with 'test' (+ 'entry_point'), "
            f"'asserts' or 'io', got {type(ground_truth).__name__}"
        )
    keys = set(ground_truth)
    if "io" in keys:
        return StdioTests(_parse_io_cases(ground_truth["io"], where))
    if "asserts" in keys:
        asserts = ground_truth["asserts"]
        if not isinstance(asserts, list) or not asserts or not all(isinstance(a, str) for a in asserts):
            raise ValueError(f"{where}: ground_truth.asserts must be a non-empty list of strings")
        setup = ground_truth.get("setup", "")
        if not isinstance(setup, str):
            raise ValueError(f"{where}: ground_truth.setup must be a string")
        return _function_tests("\n".join([setup, *asserts]), None, where)
    if "test" in keys:
        test_code, entry_point = ground_truth["test"], ground_truth.get("entry_point")
        if not isinstance(test_code, str) or not test_code.strip():
            raise ValueError(f"{where}: ground_truth.test must be a non-empty string of Python code")
        if entry_point is not None and (
            not isinstance(entry_point, str) or not entry_point.isidentifier()
        ):
            raise ValueError(f"{where}: ground_truth.entry_point must be a Python name, got {entry_point!r}")
        return _function_tests(test_code, entry_point, where)
    raise ValueError(
        f"{where}: code ground_truth needs 'test' (+ 'entry_point'), 'asserts' or 'io'; got keys "
        f"{sorted(keys)}"
    )


def _parse_io_cases(cases: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(cases, list) or not cases:
        raise ValueError(f"{where}: ground_truth.io must be a non-empty list of [stdin, stdout] pairs")
    parsed = []
    for index, case in enumerate(cases):
        if not (isinstance(case, list) and len(case) == 2 and all(isinstance(s, str) for s in case)):
            raise ValueError(
                f"{where}: ground_truth.io[{index}] must be a pair [stdin, expected stdout] of "
                f"strings, got {json.dumps(case)[:100]}"
            )
        parsed.append((case[0], case[1]))
    return tuple(parsed)


def _function_tests(test_code: str, entry_point: str | None, where: str) -> FunctionTests:
    try:
        tree = ast.parse(test_code)
    except SyntaxError as error:
        raise ValueError(f"{where}: the test code does not parse: {error}") from None
    if entry_point is not None and not any(
        isinstance(node, ast.FunctionDef) and node.name == "check" for node in tree.body
    ):
        raise ValueError(f"{where}: with an entry_point the test code must define check(candidate)")
    return FunctionTests(test_code, entry_point, _candidate_names(tree, entry_point))


def _candidate_names(tree: ast.AST, entry_point: str | None) -> tuple[str, ...]:
    loaded, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded.append(node.id) if isinstance(node.ctx, ast.Load) else bound.add(node.id))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    names = [name for name in loaded if name not in bound and not hasattr(builtins, name)]
    if entry_point is not None:
        names.append(entry_point)
    return tuple(dict.fromkeys(names))


# --- code in model responses ------------------------------------------------------------------


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in ``text``: a fenced Python block (the one defining ``entry_point`` if given,
    else the last one), or the whole text when it has no fence. Linear time, no parsing."""
    blocks = _fenced_blocks(text)
    python_blocks = [body for tag, body in blocks if tag in PYTHON_FENCE_TAGS]
    if not python_blocks:
        return text.strip("\n") if not blocks else ""
    if entry_point is not None:
        for body in python_blocks:
            if defines(body, entry_point):
                return body
    return python_blocks[-1]


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    blocks, position = [], 0
    while (start := text.find("```", position)) != -1:
        header_end = text.find("\n", start)
        if header_end == -1:
            break
        tag = text[start + 3 : header_end].strip().lower()
        end = text.find("```", header_end + 1)
        if end == -1:  # unclosed fence: take the rest (a truncated response)
            blocks.append((tag, text[header_end + 1 :]))
            break
        blocks.append((tag, text[header_end + 1 : end]))
        position = end + 3
    return blocks


def defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None


def import_lines(code: str) -> str:
    """Top-level import statements of ``code`` (to give a bare function the prompt's imports)."""
    return "\n".join(line for line in code.splitlines() if re.match(r"(?:import|from)[ \t]+\w", line))


def normalise_stdout(text: str) -> list[str]:
    """Lines without trailing whitespace, trailing blank lines dropped, CRLF as LF."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines
