"""Loaders of the public benchmark formats, on small files in each format written here.

Each format's items are checked field by field, and graded with the real verifiers (math-verify
and the code tests run in the real sandbox): a correct answer passes, a wrong one fails. Malformed
records are errors naming file:line; unsupported records are skipped and counted.
"""

from __future__ import annotations

import base64
import csv
import gzip
import json
import pickle
import zlib
from pathlib import Path

import pytest

from megatron_rlhf.evaluation.ability.grading import PolicyAnswers, grade_answers, open_graders
from megatron_rlhf.evaluation.ability.loaders import LOADERS, load_task
from megatron_rlhf.evaluation.ability.loaders.math import last_boxed
from megatron_rlhf.evaluation.ability.suite import TaskSpec


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _load(fmt: str, path: Path):
    return LOADERS[fmt](path, fmt)


def test_math500_answer_field_and_math_solution_boxed(tmp_path):
    math500 = _jsonl(tmp_path / "math500.jsonl", [
        {"problem": "What is $1+1$?", "solution": "...", "answer": "2", "subject": "Algebra", "level": 1,
         "unique_id": "test/algebra/1.json"},
    ])
    folder = tmp_path / "MATH" / "test" / "algebra"
    folder.mkdir(parents=True)
    (folder / "7.json").write_text(json.dumps({"problem": "Simplify $\\frac{2}{4}$.", "level": "Level 1",
                                               "type": "Algebra", "solution": "So $\\boxed{\\frac{1}{2}}$."}))
    [item] = _load("math", math500).items
    assert (item.id, item.grader, item.ground_truth) == ("test/algebra/1.json", "math", "2")
    assert item.prompt.startswith("What is $1+1$?") and "\\boxed{}" in item.prompt
    [from_solution] = _load("math", tmp_path / "MATH").items
    assert from_solution.ground_truth == "\\frac{1}{2}" and from_solution.source.endswith("7.json")


def test_last_boxed_takes_the_last_balanced_box():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert last_boxed("\\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("no box") is None and last_boxed("\\boxed{unclosed") is None


def test_gsm8k_reference_after_the_hash_marks(tmp_path):
    path = _jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 1,000 apples and buys 200 more. How many?", "answer": "1000+200=<<1200>>\n#### 1,200"},
    ])
    [item] = _load("gsm8k", path).items
    assert item.ground_truth == "1200" and item.grader == "math"
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: GSM8K 'answer' must end with '#### <number>'"):
        _load("gsm8k", bad)


def test_gpqa_csv_shuffles_options_the_same_way_every_time(tmp_path):
    path = tmp_path / "gpqa_diamond.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                         "Incorrect Answer 3", "Subdomain"])
        writer.writerow(["rec1", "Which particle is a lepton?", "electron", "proton", "neutron", "pion", "Physics"])
    [item] = _load("gpqa", path).items
    assert item.id == "rec1" and item.ground_truth["choices"] == 4
    letter = item.ground_truth["answer"]
    assert f"({letter}) electron" in item.prompt
    assert [i.prompt for i in _load("gpqa", path).items] == [item.prompt]
    header_only = tmp_path / "wrong.csv"
    header_only.write_text("Question,Answer\nq,a\n")
    with pytest.raises(ValueError, match=r"wrong\.csv:1: GPQA CSV header lacks column"):
        _load("gpqa", header_only)


def test_mmlu_csv_jsonl_index_and_mmlu_pro_letter(tmp_path):
    path = tmp_path / "anatomy_test.csv"
    path.write_text('"Which organ pumps blood?",lung,heart,liver,kidney,B\n')
    [row] = _load("mmlu", path).items
    assert row.ground_truth == {"answer": "B", "choices": 4} and "(B) heart" in row.prompt
    jsonl = _jsonl(tmp_path / "mmlu.jsonl", [
        {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1},
        {"question_id": 70, "question": "Pick J", "options": list("abcdefghij"), "answer": "J", "answer_index": 9},
    ])
    first, pro = _load("mmlu", jsonl).items
    assert first.ground_truth == {"answer": "B", "choices": 4}
    assert pro.id == "70" and pro.ground_truth == {"answer": "J", "choices": 10} and "(J) j" in pro.prompt
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: answer 5 is neither a letter of AB nor an index below 2"):
        _load("mmlu", bad)


HUMANEVAL_RECORD = {
    "task_id": "HumanEval/0", "entry_point": "add",
    "prompt": "import math\n\n\ndef add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}


def test_humaneval_jsonl_gz_chat_and_completion_prompts(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt") as stream:
        stream.write(json.dumps(HUMANEVAL_RECORD) + "\n")
    [item] = _load("humaneval", path).items
    assert item.id == "HumanEval/0" and item.grader == "code"
    assert item.ground_truth == {"test": HUMANEVAL_RECORD["test"], "entry_point": "add"}
    assert "```python\nimport math" in item.text(chat_template=True)
    assert item.text(chat_template=False) == HUMANEVAL_RECORD["prompt"]


def test_mbpp_full_and_sanitized(tmp_path):
    path = _jsonl(tmp_path / "mbpp.jsonl", [
        {"task_id": 11, "text": "Write a function to double a number.", "code": "def double(x):\n    return 2 * x",
         "test_list": ["assert double(2) == 4", "assert double(0) == 0"], "test_setup_code": "",
         "challenge_test_list": []},
        {"task_id": 12, "prompt": "Write a function to take a square root.", "code": "...",
         "test_imports": ["import math"], "test_list": ["assert math.isclose(root(4), 2)"]},
    ])
    full, sanitized = _load("mbpp", path).items
    assert full.id == "11" and full.ground_truth == {"asserts": ["assert double(2) == 4", "assert double(0) == 0"],
                                                     "setup": ""}
    assert "assert double(2) == 4" in full.prompt
    assert sanitized.ground_truth["setup"] == "import math"


def _compressed(cases: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def test_livecodebench_public_and_compressed_private_cases_function_tests_skipped(tmp_path):
    public = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
    private = [{"input": "5 5\n", "output": "10\n", "testtype": "stdin"}]
    path = _jsonl(tmp_path / "lcb.jsonl", [
        {"question_title": "A+B", "question_content": "Read a and b; print a+b.", "platform": "atcoder",
         "question_id": "abc001_a", "starter_code": "", "difficulty": "easy",
         "public_test_cases": json.dumps(public), "private_test_cases": _compressed(private), "metadata": "{}"},
        {"question_title": "Two sum", "question_content": "class Solution: ...", "platform": "leetcode",
         "question_id": "1", "public_test_cases": json.dumps([{"input": "[1]", "output": "1", "testtype": "functional"}]),
         "private_test_cases": "[]"},
    ])
    loaded = _load("livecodebench", path)
    [item] = loaded.items
    assert item.id == "abc001_a" and item.ground_truth == {"io": [["1 2\n", "3\n"], ["5 5\n", "10\n"]]}
    assert loaded.skipped == {"function-call tests (only stdin/stdout problems are graded)": 1}


def test_livecodebench_compressed_cases_refuse_pickled_objects(tmp_path):
    hostile = base64.b64encode(zlib.compress(pickle.dumps(Path("/etc/passwd")))).decode()
    path = _jsonl(tmp_path / "lcb.jsonl", [{"question_content": "x", "public_test_cases": "[]",
                                            "private_test_cases": hostile}])
    with pytest.raises(ValueError, match=r"lcb\.jsonl:1: private_test_cases: .*refused global"):
        _load("livecodebench", path)


def test_ifeval_instructions_become_constraints_and_unsupported_ones_are_skipped(tmp_path):
    path = _jsonl(tmp_path / "ifeval.jsonl", [
        {"key": 1000, "prompt": "Write a short poem without commas, in lowercase, under 30 words.",
         "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase",
                                 "length_constraints:number_words"],
         "kwargs": [{}, {"num_words": None}, {"relation": "less than", "num_words": 30}]},
        {"key": 1001, "prompt": "Answer in French.", "instruction_id_list": ["language:response_language"],
         "kwargs": [{"language": "fr"}]},
    ])
    loaded = _load("ifeval", path)
    [item] = loaded.items
    assert item.id == "1000" and item.grader == "instruction_following"
    assert item.ground_truth == {"constraints": [{"type": "no_commas"}, {"type": "lowercase"},
                                                 {"type": "word_count", "max": 29}]}
    assert loaded.skipped == {"instruction language:response_language has no check": 1}
    more = _jsonl(tmp_path / "more.jsonl", [
        {"key": 7, "prompt": "Two paragraphs, the second starting with 'then', a P.S., few capitals.",
         "instruction_id_list": ["length_constraints:nth_paragraph_first_word", "detectable_content:postscript",
                                 "change_case:capital_word_frequency", "combination:repeat_prompt"],
         "kwargs": [{"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}, {"postscript_marker": "P.S."},
                    {"capital_frequency": 3, "capital_relation": "less than"}, {"prompt_to_repeat": "Two paragraphs"}]},
    ])
    [mapped] = _load("ifeval", more).items
    assert mapped.ground_truth["constraints"] == [
        {"type": "paragraph_first_word", "count": 2, "nth": 2, "word": "then"}, {"type": "postscript", "marker": "P.S."},
        {"type": "capital_word_count", "max": 2}, {"type": "repeat_prompt", "prompt": "Two paragraphs"}]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "instruction_id_list": ["keywords:frequency"],
                                           "kwargs": [{"keyword": "x", "frequency": 2, "relation": "about"}]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: instruction keywords:frequency: relation='about'"):
        _load("ifeval", bad)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"gsm8k\.jsonl:2: not valid JSON"):
        _load("gsm8k", path)
    missing = _jsonl(tmp_path / "m.jsonl", [{"problem": "p"}])
    with pytest.raises(ValueError, match=r"m\.jsonl:1: missing field 'solution'"):
        _load("math", missing)


def test_limit_and_an_empty_task(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", [{"question": f"q{n}", "answer": f"#### {n}"} for n in range(5)])
    assert len(load_task(TaskSpec("g", "gsm8k", path, "logic", limit=2)).items) == 2
    only_unsupported = _jsonl(tmp_path / "if.jsonl", [{"prompt": "p", "instruction_id_list": ["language:response_language"],
                                                       "kwargs": [{"language": "de"}]}])
    with pytest.raises(ValueError, match=r"task 'if': .* holds no gradable ifeval item"):
        load_task(TaskSpec("if", "ifeval", only_unsupported, "instruction_following"))


def test_every_format_graded_by_its_real_verifier(tmp_path):
    """A correct answer to each loaded item passes its verifier and a wrong one fails (the math and
    code verifiers run in the real sandbox)."""
    files = {
        "gsm8k": _jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "#### 2"}]),
        "math": _jsonl(tmp_path / "math.jsonl", [{"problem": "Half?", "solution": "$\\boxed{\\frac{1}{2}}$"}]),
        "mmlu": _jsonl(tmp_path / "mmlu.jsonl", [{"question": "2+2?", "choices": ["3", "4"], "answer": 1}]),
        "humaneval": _jsonl(tmp_path / "he.jsonl", [HUMANEVAL_RECORD]),
        "mbpp": _jsonl(tmp_path / "mbpp.jsonl", [{"text": "Double it.", "test_list": ["assert double(2) == 4"]}]),
        "livecodebench": _jsonl(tmp_path / "lcb.jsonl", [{"question_content": "Add.", "public_test_cases": json.dumps(
            [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}])}]),
        "ifeval": _jsonl(tmp_path / "if.jsonl", [{"prompt": "No commas.", "instruction_id_list": ["punctuation:no_comma"],
                                                  "kwargs": [{}]}]),
    }
    right = {"gsm8k": "So the answer is \\boxed{2}.", "math": "It is \\boxed{0.5}.", "mmlu": "The answer is (B).",
             "humaneval": "```python\ndef add(a, b):\n    return a + b\n```",
             "mbpp": "```python\ndef double(x):\n    return x * 2\n```",
             "livecodebench": "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
             "ifeval": "yes sir"}
    wrong = {"gsm8k": "\\boxed{3}", "math": "\\boxed{2}", "mmlu": "The answer is (A).",
             "humaneval": "```python\ndef add(a, b):\n    return a - b\n```",
             "mbpp": "```python\ndef double(x):\n    return x\n```",
             "livecodebench": "```python\nprint(0)\n```", "ifeval": "yes, sir"}
    items = [item for fmt, path in files.items() for item in _load(fmt, path).items]
    formats = list(files)
    answers = PolicyAnswers(greedy={index: right[fmt] for index, fmt in enumerate(formats)},
                            sampled={index: [wrong[fmt]] for index, fmt in enumerate(formats)})
    with open_graders({item.grader for item in items}, {}) as graders:
        graded = grade_answers(items, answers, graders)
    verdicts = {(formats[answer.item], answer.kind): (answer.passed, answer.result.detail) for answer in graded}
    for fmt in formats:
        assert verdicts[(fmt, "greedy")][0], (fmt, verdicts[(fmt, "greedy")])
        assert not verdicts[(fmt, "sampled")][0], (fmt, verdicts[(fmt, "sampled")])
