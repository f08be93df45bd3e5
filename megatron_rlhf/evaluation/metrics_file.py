"""Reading the per-step metrics JSONL file of a run (the file :mod:`megatron_rlhf.trainer.metrics_log` writes).

A light module (json and pathlib only) so that reports and tools read a run's metrics without
importing the trainer. Guarantees: records come back in file order, each an object with an
integer ``step``; a malformed line raises ``ValueError`` naming ``file:line``, except a torn last
line (a write cut short by a crash), which is dropped when asked. It does not check that steps
increase (the writer guarantees that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics_jsonl(path: str | os.PathLike[str], *, drop_torn_tail: bool = True) -> list[dict[str, Any]]:
    """The step records of a metrics JSONL file, in file order.

    A last line without a trailing newline that does not parse (a write cut short by a crash) is
    dropped when ``drop_torn_tail``; any other malformed line raises ValueError naming
    ``file:line``. Every record must be an object with an integer ``step``.
    """
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_torn_tail = number == len(lines) and not text.endswith("\n")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if is_torn_tail and drop_torn_tail:
                break
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: a metrics record must be an object with an integer 'step'")
        records.append(record)
    return records
