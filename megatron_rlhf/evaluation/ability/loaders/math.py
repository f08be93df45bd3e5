"""MATH / MATH-500 and GSM8K loaders (graded by the math verifier, answer in ``\\boxed{}``).

MATH-500 records carry the reference in ``answer``; the original MATH release (one JSON file per
problem, or JSON Lines) only in ``solution``, whose last ``\\boxed{...}`` (or ``\\fbox{...}``) is
taken. GSM8K's reference is what follows ``####`` at the end of ``answer``, thousands separators
removed.
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron_rlhf.evaluation.ability.items import EvalItem, LoadedTask, field_of, read_records

MATH_INSTRUCTION = "\n\nReason step by step, and put your final answer within \\boxed{}."
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` in ``text`` (one linear scan), or None."""
    for match in reversed(list(_BOX.finditer(text))):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            char = text[position]
            if char == "{" and text[position - 1] != "\\":
                depth += 1
            elif char == "}" and text[position - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[start:position].strip()
    return None


def load_math(path: Path, task: str) -> LoadedTask:
    loaded = LoadedTask([])
    for number, (where, record) in enumerate(read_records(path)):
        problem = field_of(record, ("problem",), where)
        if record.get("answer") is not None:
            answer = str(record["answer"]).strip()
        else:
            answer = last_boxed(field_of(record, ("solution",), where)) or ""
        if not answer:
            raise ValueError(f"{where}: no reference answer (no 'answer' field and no \\boxed{{}} in 'solution')")
        item_id = str(record.get("unique_id") or record.get("id") or f"{task}:{number}")
        loaded.items.append(EvalItem(item_id, task, "math", problem + MATH_INSTRUCTION, answer, source=where))
    return loaded


def load_gsm8k(path: Path, task: str) -> LoadedTask:
    loaded = LoadedTask([])
    for number, (where, record) in enumerate(read_records(path)):
        question = field_of(record, ("question",), where)
        solution = field_of(record, ("answer",), where)
        _, marker, final = solution.rpartition("####")
        answer = final.strip().replace(",", "")
        if not marker or not answer:
            raise ValueError(f"{where}: GSM8K 'answer' must end with '#### <number>', got {solution[-80:]!r}")
        item_id = str(record.get("id") or f"{task}:{number}")
        loaded.items.append(EvalItem(item_id, task, "math", question + MATH_INSTRUCTION, answer, source=where))
    return loaded
