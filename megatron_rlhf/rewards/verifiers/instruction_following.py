"""Verifiable instruction-following constraints (IFEval style), checked with plain string code.

Ground truth: ``{"constraints": [{"type": "<kind>", ...parameters}, ...]}`` (or the bare list).
Kinds and their parameters:

==================== ============================================================================
word_count           ``min`` and/or ``max`` words (whitespace-separated tokens)
sentence_count       ``min`` and/or ``max`` sentences (ended by . ! ? or the end of the text)
paragraph_count      ``count`` paragraphs (separated by blank lines or a line of ``***``)
include_keywords     every word/phrase of ``keywords`` appears (case-insensitive, whole words)
forbidden_keywords   none of ``keywords`` appears
keyword_frequency    ``keyword`` appears ``min`` and/or ``max`` times
letter_frequency     ``letter`` appears ``min`` and/or ``max`` times (case-insensitive)
json_format          the response (optionally in a ```json fence) is valid JSON
lowercase            no upper-case letter
uppercase            no lower-case letter
bullet_count         exactly ``count`` markdown bullets (lines starting with ``*`` or ``-``)
starts_with          begins with ``prefix``
ends_with            ends with ``suffix`` (trailing whitespace ignored)
no_commas            no comma
title                a title wrapped in double angular brackets, ``<<like this>>``
placeholder_count    at least ``min`` placeholders in square brackets, ``[address]``
section_count        exactly ``count`` sections, each starting with ``marker`` (e.g. "Section")
quoted               wrapped in double quotation marks
highlight_count      at least ``min`` highlighted spans, ``*like this*``
postscript           contains the postscript ``marker`` (e.g. "P.S."; case and a space after a dot ignored)
repeat_prompt        begins with ``prompt`` (case and surrounding whitespace ignored)
two_responses        exactly two different non-empty responses separated by ``******``
constrained_response contains "My answer is yes.", "My answer is no." or "My answer is maybe."
capital_word_count   ``min`` and/or ``max`` words written all in capitals
paragraph_first_word exactly ``count`` paragraphs (split at blank lines) and paragraph ``nth``
                     (1-based) starts with the word ``word`` (case and punctuation ignored)
==================== ============================================================================

Reward: 1.0 when every constraint holds (else 0.0, or the satisfied fraction with
``partial_credit``). A malformed constraint is an INVALID_INPUT (data) error naming the kind.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus, Verdict

Check = Callable[[str, dict[str, Any]], bool]


def _bounds(count: int, params: dict[str, Any]) -> bool:
    return params.get("min", 0) <= count <= params.get("max", count)


def _words(text: str) -> int:
    return len(text.split())


def _sentences(text: str) -> int:
    return len([part for part in re.split(r"[.!?]+(?:\s+|$)", text) if part.strip()])


def _paragraphs(text: str) -> int:
    return len([part for part in re.split(r"\n\s*\n|\n\s*\*\*\*\s*\n", text) if part.strip()])


def _occurrences(text: str, phrase: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE))


def _is_json(text: str) -> bool:
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*\n(.*)\n\s*```", body, re.DOTALL | re.IGNORECASE)
    try:
        json.loads(fence.group(1) if fence else body)
    except (ValueError, RecursionError):
        return False
    return True


def _postscript(text: str, marker: str) -> bool:
    pattern = "".join(r"\.\s?" if char == "." else re.escape(char) for char in marker.strip())
    return re.search(pattern, text, re.IGNORECASE) is not None


def _two_responses(text: str) -> bool:
    parts = text.split("******")
    if any(not part.strip() for part in parts[1:-1]):
        return False
    responses = [part.strip() for part in parts if part.strip()]
    return len(responses) == 2 and responses[0] != responses[1]


def _paragraph_first_word(text: str, params: dict[str, Any]) -> bool:
    paragraphs = [part for part in re.split(r"\n\s*\n", text) if part.strip()]
    if len(paragraphs) != params["count"] or not 1 <= params["nth"] <= len(paragraphs):
        return False
    words = paragraphs[params["nth"] - 1].split()
    return bool(words) and words[0].strip(".,;:!?\"'()[]*").lower() == params["word"].lower()


CONSTRAINED_ANSWERS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

CONSTRAINTS: dict[str, tuple[tuple[str, ...], Check]] = {
    # kind: (required parameters, check)
    "word_count": ((), lambda t, p: _bounds(_words(t), p)),
    "sentence_count": ((), lambda t, p: _bounds(_sentences(t), p)),
    "paragraph_count": (("count",), lambda t, p: _paragraphs(t) == p["count"]),
    "include_keywords": (("keywords",), lambda t, p: all(_occurrences(t, k) for k in p["keywords"])),
    "forbidden_keywords": (("keywords",), lambda t, p: not any(_occurrences(t, k) for k in p["keywords"])),
    "keyword_frequency": (("keyword",), lambda t, p: _bounds(_occurrences(t, p["keyword"]), p)),
    "letter_frequency": (("letter",), lambda t, p: _bounds(t.lower().count(p["letter"].lower()), p)),
    "json_format": ((), lambda t, p: _is_json(t)),
    "lowercase": ((), lambda t, p: t == t.lower() and bool(t.strip())),
    "uppercase": ((), lambda t, p: t == t.upper() and bool(t.strip())),
    "bullet_count": (("count",), lambda t, p: len(re.findall(r"^[ \t]*[*-][ \t]+\S", t, re.M)) == p["count"]),
    "starts_with": (("prefix",), lambda t, p: t.lstrip().startswith(p["prefix"])),
    "ends_with": (("suffix",), lambda t, p: t.rstrip().endswith(p["suffix"])),
    "no_commas": ((), lambda t, p: "," not in t),
    "title": ((), lambda t, p: re.search(r"<<[^\n<>]+>>", t) is not None),
    "placeholder_count": (("min",), lambda t, p: len(re.findall(r"\[[^\[\]\n]+\]", t)) >= p["min"]),
    "section_count": (
        ("marker", "count"),
        lambda t, p: len(re.findall(rf"^[ \t#*]*{re.escape(p['marker'])}\s+\S", t, re.M)) == p["count"],
    ),
    "quoted": ((), lambda t, p: len(t.strip()) >= 2 and t.strip()[0] == t.strip()[-1] == '"'),
    "highlight_count": (("min",), lambda t, p: len(re.findall(r"\*[^\n*]+\*", t)) >= p["min"]),
    "postscript": (("marker",), lambda t, p: _postscript(t, p["marker"])),
    "repeat_prompt": (("prompt",), lambda t, p: t.strip().lower().startswith(p["prompt"].strip().lower())),
    "two_responses": ((), lambda t, p: _two_responses(t)),
    "constrained_response": ((), lambda t, p: any(answer in t for answer in CONSTRAINED_ANSWERS)),
    "capital_word_count": ((), lambda t, p: _bounds(sum(w.isupper() for w in re.findall(r"\w+", t)), p)),
    "paragraph_first_word": (("count", "nth", "word"), _paragraph_first_word),
}
_INT_PARAMS = ("min", "max", "count", "nth")
_STR_PARAMS = ("keyword", "letter", "prefix", "suffix", "marker", "prompt", "word")


def parse_constraints(ground_truth: Any, where: str) -> list[dict[str, Any]]:
    """Validated constraint list; ValueError naming ``where`` and the constraint on bad input."""
    constraints = ground_truth.get("constraints") if isinstance(ground_truth, dict) else ground_truth
    if not isinstance(constraints, list) or not constraints:
        raise ValueError(f"{where}: instruction-following ground_truth needs a non-empty 'constraints' list")
    for index, constraint in enumerate(constraints):
        at = f"{where}: constraints[{index}]"
        if not isinstance(constraint, dict) or constraint.get("type") not in CONSTRAINTS:
            kind = constraint.get("type") if isinstance(constraint, dict) else constraint
            raise ValueError(f"{at}: unknown constraint type {kind!r}; known: {', '.join(CONSTRAINTS)}")
        required, _ = CONSTRAINTS[constraint["type"]]
        missing = [name for name in required if name not in constraint]
        if missing:
            raise ValueError(f"{at} ({constraint['type']}): missing parameter(s) {missing}")
        for name, value in constraint.items():
            ok = (
                (name not in _INT_PARAMS or (isinstance(value, int) and not isinstance(value, bool) and value >= 0))
                and (name not in _STR_PARAMS or (isinstance(value, str) and value != ""))
                and (name != "keywords" or (isinstance(value, list) and value and all(isinstance(k, str) and k for k in value)))
            )
            if not ok:
                raise ValueError(f"{at} ({constraint['type']}): bad value {value!r} for {name!r}")
    return constraints


@dataclass(frozen=True)
class InstructionFollowingConfig:
    partial_credit: bool = False
    """Reward the fraction of constraints met instead of all-or-nothing."""


class InstructionFollowingVerifier:
    """:class:`~megatron_rlhf.rewards.interface.RewardSource` for ``domain: instruction_following``."""

    name = "instruction_following"

    def __init__(self, config: InstructionFollowingConfig) -> None:
        self.config = config

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        return [self.score_one(sample) for sample in samples]

    def score_one(self, sample: RewardSample) -> RewardResult:
        started = time.monotonic()
        try:
            constraints = parse_constraints(sample.ground_truth, f"sample {sample.sample_id!r}")
        except ValueError as error:
            return RewardResult.infra_error(Verdict.INVALID_INPUT, str(error), time.monotonic() - started)
        broken = [c["type"] for c in constraints if not CONSTRAINTS[c["type"]][1](sample.response, c)]
        seconds = time.monotonic() - started
        if not broken:
            return RewardResult.correct(f"all {len(constraints)} constraints met", seconds)
        reward = (1 - len(broken) / len(constraints)) if self.config.partial_credit else 0.0
        detail = f"{len(broken)}/{len(constraints)} constraints broken: {', '.join(broken)}"
        return RewardResult(reward, RewardStatus.FAILED_VERIFICATION, Verdict.WRONG_ANSWER, detail, seconds)

    def close(self) -> None:
        """Nothing to release: this verifier runs in-process and holds no sandbox or pool."""
