"""Synthetic math, code and chat tasks for the CPU demo, small enough for a tiny model.

Three task families, each deterministic for a seed (``random.Random(seed)``, no global state):

- math: arithmetic word problems ("Tom has 3 apples. Tom buys 4 more. How many apples does Tom
  have now?"), ground truth the number as a string ("7"), worked solution "3 + 4 = 7. The answer
  is 7." (the math verifier reads "the answer is X"). Knobs: operand range, number of operations,
  multiplication on/off. Every intermediate value stays a non-negative integer.
- code: one-line Python functions ("Write a Python function add_3(x) that returns x plus 3."),
  ground truth ``{"asserts": ["assert add_3(0) == 3", ...]}`` (MBPP style, what the code verifier
  runs in the sandbox), reference solution in a fenced ``python`` block, and a wrong solution that
  fails at least one assert (each family's first test input is chosen to tell them apart).
- general: chat requests with a chosen response (polite, on the request's topic) and a rejected
  one (rude, irrelevant, or about a different topic), for preference pairs and RL prompts scored
  by the reward model.

:func:`write_demo_datasets` writes all JSONL files of the demo: SFT chat examples
``{"messages": [...], "domain"}`` per domain, preference pairs ``{"prompt", "chosen", "rejected",
"domain": "general"}``, correctness-labelled math/code responses ``{"prompt", "response", "label":
0|1, "domain"}`` (the right and wrong solutions of the SFT tasks, for the outcome RM's BCE term),
and RL prompt records ``{"id", "prompt", "domain", "ground_truth"?}`` (the
schema of :mod:`megatron_rlhf.data.prompts`), each with a held-out split. Within a domain every
prompt text occurs in exactly one split (SFT + labelled responses, SFT eval, RL prompts, RL eval,
preference train, preference eval), so held-out sets are never seen in training.

Sizes with the tiny tokenizer (``train_tiny_tokenizer(500)``, chat template included) at the
default difficulties: RL prompts at most 72 tokens, SFT examples and preference pairs at most 128
(checked by the tests). Not guaranteed: token counts with another tokenizer or with wider
difficulty knobs; the wrong solutions are wrong, not adversarial.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_rlhf.data.jsonl import write_jsonl

MATH_DOMAIN, CODE_DOMAIN, GENERAL_DOMAIN = "math", "code", "general"

_NAMES = ("Tom", "Ann", "Bob", "Sam", "Eve", "Max", "Zoe", "Ben", "Amy", "Leo", "Mia", "Dan")
_ITEMS = ("apples", "pens", "books", "coins", "cards", "eggs", "shells", "stamps", "cookies", "marbles")
_VERBS = ("sort", "count", "sum", "filter", "merge", "parse", "format", "check", "split", "join",
          "clean", "search", "reverse", "print", "store", "read")
_NOUNS = ("list", "string", "file", "number", "table", "word", "array", "sentence", "queue",
          "record", "message", "column", "schedule", "report", "note", "letter", "map")
_WORDS = ("apple", "banana", "cherry", "table", "river", "stone", "bread", "lemon", "tiger", "paper")
_LETTERS = "aeiourstln"


# --- math -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MathDifficulty:
    """How hard the word problems are."""

    operand_min: int = 1
    """Smallest operand of an addition/subtraction (and the starting amount). >= 0."""
    operand_max: int = 20
    """Largest operand of an addition/subtraction. >= operand_min."""
    min_operations: int = 1
    """Fewest operations after the starting amount. >= 1."""
    max_operations: int = 2
    """Most operations after the starting amount. >= min_operations, <= 4 (texts stay short)."""
    multiplication: bool = True
    """Allow "the number of X doubles/triples" steps (factor 2 or 3)."""

    def __post_init__(self) -> None:
        if not (0 <= self.operand_min <= self.operand_max and self.operand_max >= 1):
            raise ValueError(
                f"math operands need 0 <= operand_min <= operand_max and operand_max >= 1, got "
                f"{self.operand_min}, {self.operand_max}"
            )
        if not 1 <= self.min_operations <= self.max_operations <= 4:
            raise ValueError(
                f"math operations need 1 <= min_operations <= max_operations <= 4, got "
                f"{self.min_operations}, {self.max_operations}"
            )


@dataclass(frozen=True)
class MathTask:
    prompt: str
    answer: str
    """Ground truth: the final number as a string."""
    solution: str
    """Worked SFT answer ending in "The answer is <answer>."."""
    wrong_solution: str
    """Same format with a wrong final number."""


def generate_math_task(rng: random.Random, difficulty: MathDifficulty) -> MathTask:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    value = rng.randint(max(difficulty.operand_min, 1), max(difficulty.operand_max, 1))
    sentences, steps = [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(difficulty.min_operations, difficulty.max_operations)):
        kinds = ["add", "subtract"] + (["multiply"] if difficulty.multiplication else [])
        kind = rng.choice(kinds)
        if kind == "subtract" and value < max(difficulty.operand_min, 1):
            kind = "add"
        if kind == "add":
            operand = rng.randint(difficulty.operand_min, difficulty.operand_max)
            sentences.append(f"{name} {rng.choice(('buys', 'finds', 'gets'))} {operand} more.")
            steps.append(f"{value} + {operand} = {value + operand}.")
            value += operand
        elif kind == "subtract":
            operand = rng.randint(max(difficulty.operand_min, 1), min(difficulty.operand_max, value))
            sentences.append(f"{name} gives {operand} to {friend}.")
            steps.append(f"{value} - {operand} = {value - operand}.")
            value -= operand
        else:
            factor = rng.choice((2, 3))
            sentences.append(f"Then the number of {item} {'doubles' if factor == 2 else 'triples'}.")
            steps.append(f"{value} * {factor} = {value * factor}.")
            value *= factor
    prompt = " ".join(sentences) + f" How many {item} does {name} have now?"
    wrong = value + rng.choice((-2, -1, 1, 2)) if value >= 2 else value + rng.choice((1, 2))
    return MathTask(
        prompt, str(value), " ".join(steps) + f" The answer is {value}.",
        " ".join(steps[:-1] + [f"So we get {wrong}."]) + f" The answer is {wrong}.",
    )


# --- code -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeDifficulty:
    """Range of the constants in the code tasks."""

    constant_max: int = 50
    """Largest constant k in add_k, times_k, greater_than_k, ... (list/string tasks cap it lower). >= 2."""

    def __post_init__(self) -> None:
        if self.constant_max < 2:
            raise ValueError(f"code constant_max must be >= 2, got {self.constant_max}")


@dataclass(frozen=True)
class CodeTask:
    prompt: str
    entry_point: str
    """Name of the function to write."""
    ground_truth: dict[str, Any]
    """``{"asserts": [...]}`` for the code verifier."""
    solution: str
    """Reference SFT answer: the function in a fenced python block."""
    wrong_solution: str
    """A function of the same name that fails at least one assert."""


@dataclass(frozen=True)
class _CodeFamily:
    names: tuple[str, ...]
    """Function-name patterns with {p} (synonyms give distinct prompts for the same task)."""
    argument: str
    statement: str
    body: str
    wrong_body: str
    expected: Callable[[Any, Any], Any]
    inputs: Callable[[random.Random, Any], list[Any]]
    """Test inputs; the first one tells the right and the wrong body apart."""
    params: Callable[[CodeDifficulty], list[Any]]


def _ints(first: Callable[[Any], int]) -> Callable[[random.Random, Any], list[Any]]:
    return lambda rng, p: [first(p), rng.randint(-9, 30), rng.randint(31, 99)]


def _items(rng: random.Random, p: Any) -> list[Any]:
    return [list(range(1, p + 3)), [rng.randint(0, 9) for _ in range(p + 1)], []]


def _strings(rng: random.Random, p: Any) -> list[Any]:
    return [f"x{p}z{p}", rng.choice(_WORDS), rng.choice(_WORDS) + rng.choice(_WORDS)]


def _constants(difficulty: CodeDifficulty) -> list[Any]:
    return list(range(1, difficulty.constant_max + 1))


_CODE_FAMILIES = (
    _CodeFamily(("add_{p}", "plus_{p}"), "x", "returns x plus {p}", "return x + {p}", "return x - {p}",
                lambda x, p: x + p, _ints(lambda p: 0), _constants),
    _CodeFamily(("subtract_{p}", "minus_{p}"), "x", "returns x minus {p}", "return x - {p}", "return {p} - x",
                lambda x, p: x - p, _ints(lambda p: 0), _constants),
    _CodeFamily(("times_{p}", "multiply_by_{p}"), "x", "returns x times {p}", "return x * {p}", "return x + {p}",
                lambda x, p: x * p, _ints(lambda p: 0), _constants),
    _CodeFamily(("is_multiple_of_{p}", "divisible_by_{p}"), "x", "returns True if x is divisible by {p}",
                "return x % {p} == 0", "return x % {p} != 0", lambda x, p: x % p == 0, _ints(lambda p: p),
                lambda d: list(range(2, d.constant_max + 1))),
    _CodeFamily(("greater_than_{p}", "above_{p}"), "x", "returns True if x is greater than {p}",
                "return x > {p}", "return x >= {p}", lambda x, p: x > p, _ints(lambda p: p), _constants),
    _CodeFamily(("first_{p}", "head_{p}"), "items", "returns the first {p} items of the list items",
                "return items[:{p}]", "return items[{p}:]", lambda x, p: x[:p], _items,
                lambda d: list(range(1, min(9, d.constant_max) + 1))),
    _CodeFamily(("last_{p}", "tail_{p}"), "items", "returns the last {p} items of the list items",
                "return items[-{p}:]", "return items[:{p}]", lambda x, p: x[-p:], _items,
                lambda d: list(range(1, min(9, d.constant_max) + 1))),
    _CodeFamily(("repeat_{p}",), "s", "returns the string s repeated {p} times", "return s * {p}",
                "return s * ({p} + 1)", lambda x, p: x * p, _strings, lambda d: list(range(2, min(5, d.constant_max) + 1))),
    _CodeFamily(("count_{p}",), "s", "returns how many times the letter '{p}' is in s", "return s.count('{p}')",
                "return len(s)", lambda x, p: x.count(p), _strings, lambda d: list(_LETTERS)),
)


def generate_code_task(rng: random.Random, difficulty: CodeDifficulty) -> CodeTask:
    family = rng.choice(_CODE_FAMILIES)
    param = rng.choice(family.params(difficulty))
    name = rng.choice(family.names).format(p=param)
    prompt = f"Write a Python function {name}({family.argument}) that {family.statement.format(p=param)}."
    asserts = [f"assert {name}({value!r}) == {family.expected(value, param)!r}" for value in family.inputs(rng, param)]

    def fenced(body: str) -> str:
        return f"```python\ndef {name}({family.argument}):\n    {body.format(p=param)}\n```"

    return CodeTask(prompt, name, {"asserts": asserts}, fenced(family.body), fenced(family.wrong_body))


# --- general chat -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatPair:
    prompt: str
    chosen: str
    """Polite and about the request."""
    rejected: str
    """Rude, irrelevant, or about a different topic."""


def generate_chat_pair(rng: random.Random) -> ChatPair:
    verb, noun = rng.choice(_VERBS), rng.choice(_NOUNS)
    template = rng.randrange(4)
    if template == 0:
        prompt, chosen = f"Can you help me {verb} a {noun}?", f"Sure! To {verb} a {noun}, start small and check each step."
    elif template == 1:
        prompt, chosen = f"How do I {verb} a {noun}?", f"First look at the {noun}, then {verb} it one part at a time."
    elif template == 2:
        prompt, chosen = f"Give me a tip to {verb} a {noun}.", f"Here is a tip: {verb} the {noun} in small parts and test it."
    else:
        name = rng.choice(_NAMES)
        prompt, chosen = f"Please greet {name} and ask about the {noun}.", f"Hello, {name}! How is the {noun} going?"
    other_verb = rng.choice([v for v in _VERBS if v != verb])
    other_noun = rng.choice([n for n in _NOUNS if n != noun])
    rejected = rng.choice((
        "No. Do it yourself.",
        "That is a silly question. Go away.",
        f"I like {rng.choice(_ITEMS)}. The sky is blue today.",
        f"To {other_verb} a {other_noun}, use a hammer.",
    ))
    return ChatPair(prompt, chosen, rejected)


# --- demo files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoDatasetSizes:
    """Number of examples per file (per domain where said)."""

    sft_per_domain: int = 128
    """SFT chat examples per domain (math, code, general)."""
    sft_eval_per_domain: int = 16
    """Held-out SFT examples per domain."""
    prompts_per_domain: int = 128
    """RL prompt records per domain."""
    eval_prompts_per_domain: int = 32
    """Held-out RL prompt records per domain (evaluation)."""
    preference_pairs: int = 256
    """General-domain preference pairs for reward-model training."""
    preference_eval_pairs: int = 64
    """Held-out preference pairs (reward-model accuracy)."""
    math: MathDifficulty = field(default_factory=MathDifficulty)
    code: CodeDifficulty = field(default_factory=CodeDifficulty)

    def __post_init__(self) -> None:
        for name in ("sft_per_domain", "sft_eval_per_domain", "prompts_per_domain", "eval_prompts_per_domain",
                     "preference_pairs", "preference_eval_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"demo dataset size {name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class DemoDatasetPaths:
    sft_train: Path
    sft_eval: Path
    prompts_train: Path
    prompts_eval: Path
    preference_train: Path
    preference_eval: Path
    reasoning_labelled: Path
    """Correctness-labelled math/code responses (the SFT tasks' right and wrong solutions)."""


def unique_tasks(generate: Callable[[random.Random], Any], prompt_of: Callable[[Any], str], count: int,
                 rng: random.Random, what: str) -> list[Any]:
    """``count`` tasks with distinct prompts; ValueError when the generator cannot make that many."""
    tasks, seen, attempts = [], set(), 0
    while len(tasks) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(
                f"only {len(tasks)} distinct {what} tasks found, {count} asked for: lower the sizes or "
                f"widen the difficulty ranges"
            )
        task = generate(rng)
        if prompt_of(task) not in seen:
            seen.add(prompt_of(task))
            tasks.append(task)
    return tasks


def _split(tasks: list[Any], sizes: list[int]) -> list[list[Any]]:
    parts, start = [], 0
    for size in sizes:
        parts.append(tasks[start : start + size])
        start += size
    return parts


def _sft(prompt: str, response: str, domain: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], "domain": domain}


def write_demo_datasets(out_dir: str | Path, seed: int = 0, sizes: DemoDatasetSizes = DemoDatasetSizes()) -> DemoDatasetPaths:
    """Write the demo's JSONL files under ``out_dir`` (see the module docstring); same seed, same bytes."""
    out = Path(out_dir)
    split_sizes = [sizes.sft_per_domain, sizes.sft_eval_per_domain, sizes.prompts_per_domain, sizes.eval_prompts_per_domain]
    total = sum(split_sizes)
    math_tasks = unique_tasks(lambda r: generate_math_task(r, sizes.math), lambda t: t.prompt, total,
                              random.Random(f"math:{seed}"), "math")
    code_tasks = unique_tasks(lambda r: generate_code_task(r, sizes.code), lambda t: t.prompt, total,
                              random.Random(f"code:{seed}"), "code")
    chat_pairs = unique_tasks(generate_chat_pair, lambda t: t.prompt, total + sizes.preference_pairs + sizes.preference_eval_pairs,
                              random.Random(f"general:{seed}"), "general")
    math_sft, math_sft_eval, math_rl, math_rl_eval = _split(math_tasks, split_sizes)
    code_sft, code_sft_eval, code_rl, code_rl_eval = _split(code_tasks, split_sizes)
    chat_sft, chat_sft_eval, chat_rl, chat_rl_eval, pref_train, pref_eval = _split(
        chat_pairs, split_sizes + [sizes.preference_pairs, sizes.preference_eval_pairs]
    )

    def sft_rows(math_part: list[MathTask], code_part: list[CodeTask], chat_part: list[ChatPair]) -> list[dict[str, Any]]:
        rows = [_sft(t.prompt, t.solution, MATH_DOMAIN) for t in math_part]
        rows += [_sft(t.prompt, t.solution, CODE_DOMAIN) for t in code_part]
        rows += [_sft(t.prompt, t.chosen, GENERAL_DOMAIN) for t in chat_part]
        random.Random(f"shuffle:{seed}:{len(rows)}").shuffle(rows)
        return rows

    def prompt_rows(split: str, math_part: list[MathTask], code_part: list[CodeTask], chat_part: list[ChatPair]) -> list[dict[str, Any]]:
        rows = [{"id": f"math-{split}-{i}", "prompt": t.prompt, "domain": MATH_DOMAIN, "ground_truth": t.answer}
                for i, t in enumerate(math_part)]
        rows += [{"id": f"code-{split}-{i}", "prompt": t.prompt, "domain": CODE_DOMAIN, "ground_truth": t.ground_truth,
                  "entry_point": t.entry_point} for i, t in enumerate(code_part)]
        rows += [{"id": f"general-{split}-{i}", "prompt": t.prompt, "domain": GENERAL_DOMAIN} for i, t in enumerate(chat_part)]
        return rows

    def preference_rows(pairs: list[ChatPair]) -> list[dict[str, Any]]:
        return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "domain": GENERAL_DOMAIN} for p in pairs]

    paths = DemoDatasetPaths(
        out / "sft_train.jsonl", out / "sft_eval.jsonl", out / "prompts_train.jsonl", out / "prompts_eval.jsonl",
        out / "preference_train.jsonl", out / "preference_eval.jsonl", out / "reasoning_labelled.jsonl",
    )
    write_jsonl(paths.sft_train, sft_rows(math_sft, code_sft, chat_sft))
    write_jsonl(paths.sft_eval, sft_rows(math_sft_eval, code_sft_eval, chat_sft_eval))
    write_jsonl(paths.prompts_train, prompt_rows("train", math_rl, code_rl, chat_rl))
    write_jsonl(paths.prompts_eval, prompt_rows("eval", math_rl_eval, code_rl_eval, chat_rl_eval))
    write_jsonl(paths.preference_train, preference_rows(pref_train))
    write_jsonl(paths.preference_eval, preference_rows(pref_eval))
    labelled = [
        {"prompt": t.prompt, "response": response, "label": label, "domain": domain}
        for domain, tasks in ((MATH_DOMAIN, math_sft), (CODE_DOMAIN, code_sft))
        for t in tasks
        for response, label in ((t.solution, 1), (t.wrong_solution, 0))
    ]
    write_jsonl(paths.reasoning_labelled, labelled)
    return paths
