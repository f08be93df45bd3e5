"""Reading JSONL datasets with errors that point at the file and line.

Every dataset of the project (prompts, chat/SFT data, preference pairs, labelled and step-labelled
responses) is one JSON object per line. :func:`read_jsonl` parses such a file with a per-record
parser; a line that is not valid JSON, not an object, or rejected by the parser becomes a
:class:`MalformedLine` that names ``file:line`` and the reason, and never stops the reading.

Guarantees: records keep file order and carry their 1-based line number; blank lines are
skipped; ``strict=True`` raises :class:`DatasetError` listing the first malformed lines (what
training entry points use unless told to skip bad lines); ``strict=False`` returns the valid
records and the malformed lines, for the caller to report and count.

Not guaranteed: the whole file is read into memory (datasets here are prompt/label sets, not
pre-training corpora).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

from megatron_rlhf.config.errors import MissingInput, UserError

Record = TypeVar("Record")
MAX_REPORTED = 10


class DatasetError(UserError):
    """A dataset file has malformed lines (the message names file:line for each)."""


class RecordError(UserError):
    """Raised by a record parser for a JSON object that does not fit the schema."""


@dataclass(frozen=True)
class MalformedLine:
    path: str
    line: int
    """1-based line number in ``path``."""
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class ParsedDataset(Generic[Record]):
    records: list[Record]
    lines: list[int]
    """1-based source line of each record."""
    malformed: list[MalformedLine]
    path: str

    def report(self) -> str:
        """One line per malformed input line (at most ``MAX_REPORTED``, then a count)."""
        shown = [str(bad) for bad in self.malformed[:MAX_REPORTED]]
        if len(self.malformed) > MAX_REPORTED:
            shown.append(f"... and {len(self.malformed) - MAX_REPORTED} more malformed lines in {self.path}")
        return "\n".join(shown)


def read_jsonl(
    path: str | Path,
    parse_record: Callable[[Mapping[str, Any]], Record],
    strict: bool = True,
) -> ParsedDataset[Record]:
    """Parse ``path`` line by line with ``parse_record`` (which raises :class:`RecordError`,
    ``KeyError``, ``TypeError`` or ``ValueError`` for a bad record)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"dataset file not found: {path}")
    records: list[Record] = []
    lines: list[int] = []
    malformed: list[MalformedLine] = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            outcome = _parse_line(raw, parse_record)
            if isinstance(outcome, str):
                malformed.append(MalformedLine(str(path), line_number, outcome))
            else:
                records.append(outcome[0])
                lines.append(line_number)
    dataset = ParsedDataset(records, lines, malformed, str(path))
    if strict and malformed:
        raise DatasetError(f"{len(malformed)} malformed line(s):\n{dataset.report()}")
    return dataset


def _parse_line(raw: bytes, parse_record: Callable[[Mapping[str, Any]], Record]) -> tuple[Record] | str:
    try:
        value = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))  # columns of the line, not of the next one
    except UnicodeDecodeError as error:
        return f"not UTF-8 ({error.reason} at byte {error.start})"
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg} at column {error.colno})"
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    try:
        return (parse_record(value),)
    except KeyError as error:
        return f"missing field {error.args[0]!r}"
    except (RecordError, TypeError, ValueError) as error:
        return str(error)


def require_str(record: Mapping[str, Any], name: str, allow_empty: bool = False) -> str:
    """``record[name]`` as a string; raises RecordError naming the field otherwise."""
    value = record[name]
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field {name!r} is empty")
    return value


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` atomically (temporary file + rename); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    count = 0
    with temporary.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    temporary.replace(path)
    return count
