"""Final-answer extraction from a math response, and the anti-spraying rules. Pure string work.

Order of preference: the last ``\\boxed{...}`` (or ``\\fbox{...}``); else the last "the (final)
answer is X" / "answer: X" / "#### X"; else the last number in the text.

Not credited (reported as a wrong answer with the reason):

- more than one *different* outermost boxed answer (``\\boxed{2} ... \\boxed{3}``);
- an answer offering alternatives (" or ", ``\\lor``, ``\\vee``, "either") when the reference
  answer does not;
- an answer longer than ``max_answer_chars`` (a final answer is short; long ones are sprayed
  expressions or garbage and are never sent to the equivalence checker).

Everything here runs in linear time with no recursion (braces are matched with one stack pass),
so a 1 MB response or 100k nested braces cost milliseconds, and nothing is parsed or evaluated:
equivalence is decided by math-verify inside the sandbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_PHRASE = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*[:：]|answer\s*[:：]|####)\s*",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_ALTERNATIVES = re.compile(r"\bor\b|\\lor\b|\\vee\b|\beither\b", re.IGNORECASE)


@dataclass(frozen=True)
class ExtractedAnswer:
    answer: str | None
    """The final answer text, or None when none was found or it is not credited."""
    method: str
    """boxed, answer_phrase, last_number, or none."""
    rejection: str | None = None
    """Why an answer that was found is not credited (spraying, too long)."""


def extract_final_answer(response: str, reference: str, max_answer_chars: int) -> ExtractedAnswer:
    boxed = _outermost_boxed(response)
    if boxed:
        distinct = list(dict.fromkeys(_squash(content) for content in boxed))
        if len(distinct) > 1:
            return ExtractedAnswer(None, "boxed", f"answer spraying: {len(distinct)} different boxed answers")
        return _judge(boxed[-1], "boxed", reference, max_answer_chars)
    phrase = _after_last_answer_phrase(response)
    if phrase is not None:
        return _judge(phrase, "answer_phrase", reference, max_answer_chars)
    number = _last_number(response)
    if number is not None:
        return _judge(number, "last_number", reference, max_answer_chars)
    return ExtractedAnswer(None, "none")


def _judge(answer: str, method: str, reference: str, max_answer_chars: int) -> ExtractedAnswer:
    answer = answer.strip().strip("$").strip()
    if not answer:
        return ExtractedAnswer(None, method)
    if len(answer) > max_answer_chars:
        return ExtractedAnswer(None, method, f"answer of {len(answer)} characters is over {max_answer_chars}")
    while (spans := _outermost_boxed_spans(answer)) and spans[0][0] == 0 and spans[0][2] == len(answer) - 1:
        answer = answer[spans[0][1] + 1 : spans[0][2]].strip()  # \boxed{\boxed{5}} -> 5
    if _ALTERNATIVES.search(answer) and not _ALTERNATIVES.search(reference):
        return ExtractedAnswer(None, method, f"answer spraying: alternatives in {answer[:100]!r}")
    return ExtractedAnswer(answer, method)


def _squash(text: str) -> str:
    return "".join(text.split())


def _outermost_boxed(text: str) -> list[str]:
    """Contents of the outermost \\boxed{...}/\\fbox{...}, in order; unbalanced ones are skipped."""
    return [text[brace + 1 : end] for _, brace, end in _outermost_boxed_spans(text)]


def _outermost_boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """(command start, opening brace, closing brace) of each outermost box."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    closing = _matching_braces(text)
    spans: list[tuple[int, int, int]] = []
    covered_until = -1
    for match in _BOX_COMMAND.finditer(text):
        brace = match.end()
        while brace < len(text) and text[brace] == " ":
            brace += 1
        if match.start() < covered_until or brace not in closing:
            continue  # inside an earlier box, or not followed by a balanced {...}
        spans.append((match.start(), brace, closing[brace]))
        covered_until = closing[brace]
    return spans


def _matching_braces(text: str) -> dict[int, int]:
    """Opening-brace index -> its closing-brace index, for balanced pairs (one pass, a stack)."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for match in re.finditer(r"\\[{}]|[{}]", text):
        token = match.group()
        if token.startswith("\\"):
            continue  # escaped \{ \} are literal braces
        if token == "{":
            stack.append(match.start())
        elif stack:
            pairs[stack.pop()] = match.start()
    return pairs


def _after_last_answer_phrase(text: str) -> str | None:
    last = None
    for last in _ANSWER_PHRASE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() :]
    line = rest.split("\n", 1)[0]
    line = re.split(r"\.(?=\s|$)", line, maxsplit=1)[0]  # end of sentence, not a decimal point
    return line.strip().strip("*").strip()


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER.finditer(text):
        pass
    if last is None:
        return None
    return last.group().replace(",", "").replace(" ", "")
