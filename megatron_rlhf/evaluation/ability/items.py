"""Evaluation items and the local file readers the format loaders share.

An :class:`EvalItem` is one benchmark question turned into what the engine and a verifier need:
the prompt (chat wording, and a raw completion-style text where the format has one) and the
verifier's ground truth. Readers accept JSON Lines (``.jsonl``, ``.jsonl.gz``), a JSON file (a
list of records, or one record), a folder of ``.json`` files (the MATH release's layout) and CSV.
Every malformed record raises ValueError naming ``file:line`` (or ``file[index]``); nothing is
fetched from the network.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass(frozen=True)
class EvalItem:
    id: str
    """The record's own id where the format has one (``task_id``, ``unique_id``), else ``<task>:<n>``."""
    task: str
    """The suite task it belongs to."""
    grader: str
    """math | multiple_choice | code | instruction_following: the verifier that grades it."""
    prompt: str
    """The question as one user turn (instructions on the answer format included)."""
    ground_truth: Any
    """What the grader checks against (answer, letter, tests, constraints)."""
    completion_prompt: str | None = None
    """Raw text for completion-style (no chat template) runs where the format defines one (HumanEval)."""
    source: str = ""
    """``file:line`` the item came from."""

    def text(self, chat_template: bool) -> str:
        """The prompt text a run uses (and the grader sees)."""
        return self.prompt if chat_template or self.completion_prompt is None else self.completion_prompt


@dataclass
class LoadedTask:
    items: list[EvalItem]
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> records of the file left out (e.g. an IFEval instruction no verifier checks)."""

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for every JSON object in ``path`` (see the module docstring for layouts)."""
    if path.is_dir():
        files = sorted(path.rglob("*.json"))
        if not files:
            raise ValueError(f"{path}: folder holds no .json files")
        for file in files:
            yield from _json_file(file)
        return
    name = path.name.lower()
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        yield from _json_lines(path)
    elif name.endswith(".json"):
        yield from _json_file(path)
    else:
        raise ValueError(f"{path}: unsupported file type (expected .jsonl, .jsonl.gz, .json or a folder of .json)")


def _json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _json_file(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    records = data if isinstance(data, list) else [data]
    for index, record in enumerate(records):
        where = f"{path}[{index}]" if isinstance(data, list) else str(path)
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def read_csv_rows(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(``file:line``, cells) for every non-empty CSV row, the header included."""
    if path.suffix.lower() != ".csv":
        raise ValueError(f"{path}: expected a .csv file")
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.reader(stream)
        for cells in reader:
            if any(cell.strip() for cell in cells):
                yield f"{path}:{reader.line_num}", cells


def field_of(record: dict[str, Any], names: tuple[str, ...], where: str, kind: type = str) -> Any:
    """The first of ``names`` present in ``record`` (of type ``kind``); ValueError naming ``where``."""
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if not isinstance(value, kind) or (kind is str and not value.strip()):
                raise ValueError(f"{where}: field {name!r} must be a non-empty {kind.__name__}, got {value!r:.80}")
            return value
    raise ValueError(f"{where}: missing field {' or '.join(repr(name) for name in names)}")
