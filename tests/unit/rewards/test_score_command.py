"""`megatron-rlhf score` as a user runs it: a JSONL file in, verdict lines out, summary last."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
LINES = [
    {"id": "m1", "domain": "math", "prompt": "1+1?", "response": "so \\boxed{2}", "ground_truth": "2"},
    {"id": "m2", "domain": "math", "prompt": "1+1?", "response": "The answer is 3.", "ground_truth": "2"},
    {"id": "c1", "domain": "code", "prompt": "", "response": "```python\ndef inc(x):\n    return x + 1\n```",
     "ground_truth": {"test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "inc"}},
    {"id": "c2", "domain": "code", "prompt": "", "response": "print(input()[::-1])",
     "ground_truth": {"io": [["abc\n", "cba\n"], ["xy\n", "yx\n"]]}},
    {"id": "c3", "domain": "code", "prompt": "", "response": "import sys\nsys.exit(0)",
     "ground_truth": {"test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "inc"}},
]


def test_score_writes_one_verdict_per_line_and_a_summary(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    rows = [json.dumps(line) for line in LINES]
    rows.insert(2, "{not json")
    rows.insert(4, json.dumps({"id": "x", "domain": "math"}))
    source.write_bytes(("\n".join(rows) + "\n").encode() + b'{"id": "u", "domain": "math", "prompt": "", "response": "\xff\xfe \\\\boxed{2}", "ground_truth": "2"}\n')
    target = tmp_path / "out.jsonl"
    child = subprocess.run(
        [sys.executable, "-m", "megatron_rlhf", "score", "--input", str(source), "--output", str(target)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 1, child.stderr  # errors (the two malformed lines) -> exit 1
    assert child.stdout.splitlines()[-1] == "scored=8 passed=4 failed=2 errors=2"
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 9))
    by_id = {r["id"]: r for r in records if r["id"] is not None}
    assert by_id["m1"]["status"] == "scored" and by_id["m1"]["reward"] == 1.0
    assert by_id["m2"]["verdict"] == "wrong_answer" and by_id["m2"]["reward"] == 0.0
    assert by_id["c1"]["verdict"] == "ok" and by_id["c2"]["verdict"] == "ok"
    assert by_id["c3"]["status"] == "failed_verification"
    assert by_id["u"]["verdict"] == "ok"  # invalid UTF-8 in the response is still scored
    malformed = [r for r in records if r["status"] == "malformed"]
    assert [r["line"] for r in malformed] == [3, 5]
    assert "in.jsonl:3" in malformed[0]["detail"] and "missing field" in malformed[1]["detail"]
    assert all(set(r) >= {"id", "reward", "status", "verdict", "seconds"} for r in records)


def test_missing_input_is_a_user_error(tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-m", "megatron_rlhf", "score", "--input", str(tmp_path / "none.jsonl"),
         "--output", str(tmp_path / "out.jsonl")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == 2 and "none.jsonl does not exist" in child.stderr
