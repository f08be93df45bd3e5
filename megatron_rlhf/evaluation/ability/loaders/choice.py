"""GPQA and MMLU-style multiple-choice loaders (graded by the multiple-choice verifier).

GPQA stores the correct answer apart from three incorrect ones; the options are shuffled with a
seed derived from the question text (SHA-256), so every run and every policy sees the same order.
MMLU-style files list the options in order with the key as a letter or a 0-based index (MMLU,
MMLU-Pro with up to 10 options, and the MMLU CSV release).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from megatron_rlhf.evaluation.ability.items import EvalItem, LoadedTask, field_of, read_csv_rows, read_records
from megatron_rlhf.rewards.verifiers.multiple_choice import LETTERS

CHOICE_INSTRUCTION = 'Answer with the letter of the correct option, in the form "The answer is (X)".'
GPQA_FIELDS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def choice_item(item_id: str, task: str, question: str, options: list[str], key: int, where: str) -> EvalItem:
    """An item asking ``question`` with ``options`` (A, B, ...) whose correct one is ``options[key]``."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"{where}: {len(options)} options; multiple choice takes 2..{len(LETTERS)}")
    listed = "\n".join(f"({LETTERS[index]}) {option.strip()}" for index, option in enumerate(options))
    prompt = f"{question.strip()}\n\n{listed}\n\n{CHOICE_INSTRUCTION}"
    truth = {"answer": LETTERS[key], "choices": len(options)}
    return EvalItem(item_id, task, "multiple_choice", prompt, truth, source=where)


def load_gpqa(path: Path, task: str) -> LoadedTask:
    loaded = LoadedTask([])
    for number, (where, record) in enumerate(_gpqa_records(path)):
        question, correct, *incorrect = (field_of(record, (name,), where).strip() for name in GPQA_FIELDS)
        options = [correct, *incorrect]
        random.Random(hashlib.sha256(question.encode()).hexdigest()).shuffle(options)
        item_id = str(record.get("Record ID") or f"{task}:{number}")
        loaded.items.append(choice_item(item_id, task, question, options, options.index(correct), where))
    return loaded


def _gpqa_records(path: Path):
    if path.suffix.lower() != ".csv":
        yield from read_records(path)
        return
    rows = read_csv_rows(path)
    header_where, header = next(rows, (str(path), []))
    missing = [name for name in GPQA_FIELDS if name not in header]
    if missing:
        raise ValueError(f"{header_where}: GPQA CSV header lacks column(s) {missing}")
    for where, cells in rows:
        yield where, dict(zip(header, cells))


def load_mmlu(path: Path, task: str) -> LoadedTask:
    loaded = LoadedTask([])
    if path.suffix.lower() == ".csv":
        for number, (where, cells) in enumerate(read_csv_rows(path)):
            if len(cells) < 4:
                raise ValueError(f"{where}: an MMLU CSV row is question, options..., answer letter; got {len(cells)} cells")
            question, options, answer = cells[0], cells[1:-1], cells[-1]
            loaded.items.append(choice_item(f"{task}:{number}", task, question, options,
                                            _key_index(answer, len(options), where), where))
        return loaded
    for number, (where, record) in enumerate(read_records(path)):
        question = field_of(record, ("question",), where)
        options = field_of(record, ("choices", "options"), where, list)
        if not all(isinstance(option, str) for option in options):
            raise ValueError(f"{where}: options must be strings")
        answer = record.get("answer", record.get("answer_index"))
        item_id = str(record.get("question_id") or record.get("id") or f"{task}:{number}")
        loaded.items.append(choice_item(item_id, task, question, options, _key_index(answer, len(options), where), where))
    return loaded


def _key_index(answer: Any, options: int, where: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < options:
        return answer
    if isinstance(answer, str) and answer.strip().upper() in LETTERS[:options]:
        return LETTERS.index(answer.strip().upper())
    raise ValueError(f"{where}: answer {answer!r} is neither a letter of {LETTERS[:options]} nor an index below {options}")
