"""IFEval loader: each instruction id + kwargs becomes a constraint of the instruction-following verifier.

The project's checks approximate IFEval's own: words are whitespace tokens, capital words are
runs of word characters, sentences end at ``.!?``, paragraphs are split at blank lines as well as
``***``, ``multiple_sections`` asks for exactly the number of sections, and "capital letters"
means no lower-case letter. A record holding an instruction with no check here
(``language:response_language``: no language detector) is skipped and counted under that
instruction, never graded on its other instructions alone. ``None`` kwargs (as in the Hugging
Face copy) are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from megatron_rlhf.evaluation.ability.items import EvalItem, LoadedTask, field_of, read_records
from megatron_rlhf.rewards.verifiers.instruction_following import parse_constraints


def _bounded(count_key: str, relation_key: str = "relation") -> Callable[[dict[str, Any]], dict[str, Any]]:
    """IFEval's ("less than" | "at least", N) as min/max bounds."""

    def convert(kwargs: dict[str, Any]) -> dict[str, Any]:
        relation, count = kwargs.get(relation_key), kwargs[count_key]
        if relation == "less than":
            return {"max": count - 1}
        if relation == "at least":
            return {"min": count}
        raise ValueError(f"{relation_key}={relation!r} (IFEval takes 'less than' or 'at least')")

    return convert


# IFEval instruction id -> (our constraint type, kwargs -> our parameters)
INSTRUCTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "punctuation:no_comma": ("no_commas", lambda k: {}),
    "length_constraints:number_words": ("word_count", _bounded("num_words")),
    "length_constraints:number_sentences": ("sentence_count", _bounded("num_sentences")),
    "length_constraints:number_paragraphs": ("paragraph_count", lambda k: {"count": k["num_paragraphs"]}),
    "keywords:existence": ("include_keywords", lambda k: {"keywords": list(k["keywords"])}),
    "keywords:forbidden_words": ("forbidden_keywords", lambda k: {"keywords": list(k["forbidden_words"])}),
    "keywords:frequency": ("keyword_frequency", lambda k: {"keyword": k["keyword"], **_bounded("frequency")(k)}),
    "keywords:letter_frequency": (
        "letter_frequency", lambda k: {"letter": k["letter"], **_bounded("let_frequency", "let_relation")(k)}),
    "detectable_format:json_format": ("json_format", lambda k: {}),
    "detectable_format:title": ("title", lambda k: {}),
    "detectable_format:number_bullet_lists": ("bullet_count", lambda k: {"count": k["num_bullets"]}),
    "detectable_format:number_highlighted_sections": ("highlight_count", lambda k: {"min": k["num_highlights"]}),
    "detectable_format:multiple_sections": (
        "section_count", lambda k: {"marker": k["section_spliter"].strip(), "count": k["num_sections"]}),
    "detectable_content:number_placeholders": ("placeholder_count", lambda k: {"min": k["num_placeholders"]}),
    "change_case:english_lowercase": ("lowercase", lambda k: {}),
    "change_case:english_capital": ("uppercase", lambda k: {}),
    "startend:end_checker": ("ends_with", lambda k: {"suffix": k["end_phrase"]}),
    "startend:quotation": ("quoted", lambda k: {}),
    "detectable_content:postscript": ("postscript", lambda k: {"marker": k["postscript_marker"]}),
    "combination:repeat_prompt": ("repeat_prompt", lambda k: {"prompt": k["prompt_to_repeat"]}),
    "combination:two_responses": ("two_responses", lambda k: {}),
    "detectable_format:constrained_response": ("constrained_response", lambda k: {}),
    "change_case:capital_word_frequency": (
        "capital_word_count", _bounded("capital_frequency", "capital_relation")),
    "length_constraints:nth_paragraph_first_word": (
        "paragraph_first_word", lambda k: {"count": k["num_paragraphs"], "nth": k["nth_paragraph"], "word": k["first_word"]}),
}


def load_ifeval(path: Path, task: str) -> LoadedTask:
    loaded = LoadedTask([])
    for number, (where, record) in enumerate(read_records(path)):
        prompt = field_of(record, ("prompt",), where)
        ids = field_of(record, ("instruction_id_list",), where, list)
        kwargs_list = record.get("kwargs") or [{} for _ in ids]
        if not isinstance(kwargs_list, list) or len(kwargs_list) != len(ids) or not all(
            isinstance(kwargs, dict) for kwargs in kwargs_list
        ):
            raise ValueError(f"{where}: 'kwargs' must be a list of objects, one per instruction id ({len(ids)})")
        unsupported = [instruction for instruction in ids if instruction not in INSTRUCTIONS]
        if unsupported:
            loaded.skip(f"instruction {unsupported[0]} has no check")
            continue
        constraints = [_constraint(instruction, kwargs, where) for instruction, kwargs in zip(ids, kwargs_list)]
        parse_constraints({"constraints": constraints}, where)  # the verifier's own validation, at load time
        item_id = str(record.get("key", f"{task}:{number}"))
        loaded.items.append(EvalItem(item_id, task, "instruction_following", prompt, {"constraints": constraints},
                                     source=where))
    return loaded


def _constraint(instruction: str, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    kind, convert = INSTRUCTIONS[instruction]
    present = {key: value for key, value in kwargs.items() if value is not None}
    try:
        return {"type": kind, **convert(present)}
    except KeyError as error:
        raise ValueError(f"{where}: instruction {instruction} lacks kwarg {error}") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: instruction {instruction}: {error}") from None
