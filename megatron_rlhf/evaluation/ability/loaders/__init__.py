"""Loaders of public benchmark formats, read from local files: one function per format.

=============== =============================================================================
format          records (JSON Lines unless said; see :mod:`..items` for the file layouts)
=============== =============================================================================
math            MATH / MATH-500: ``problem`` + ``answer``, or ``solution`` with a ``\\boxed{}``
gsm8k           GSM8K: ``question`` + ``answer`` ending in ``#### <number>``
gpqa            GPQA CSV (``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``) or JSONL
                with the same fields; options shuffled with a seed derived from the question
mmlu            MMLU CSV (question, A, B, C, D, answer letter; no header), or JSONL with
                ``question`` + ``choices``/``options`` + ``answer`` (letter or index)
humaneval       HumanEval: ``task_id``, ``prompt``, ``test``, ``entry_point``
mbpp            MBPP (full or sanitized): ``text``/``prompt``, ``test_list``, setup or imports
livecodebench   LiveCodeBench code generation: ``question_content``, public/private test cases
                (JSON, or LiveCodeBench's compressed form); stdin/stdout problems only
ifeval          IFEval: ``prompt``, ``instruction_id_list``, ``kwargs``
=============== =============================================================================

Each loader returns a :class:`~..items.LoadedTask`; records a verifier cannot grade (an IFEval
instruction with no checker, a LiveCodeBench problem with function-call tests) are skipped and
counted by reason, never graded as wrong. Malformed records raise ValueError naming ``file:line``.
"""

from __future__ import annotations

from typing import Callable

from megatron_rlhf.evaluation.ability.items import LoadedTask
from megatron_rlhf.evaluation.ability.loaders.choice import load_gpqa, load_mmlu
from megatron_rlhf.evaluation.ability.loaders.code import load_humaneval, load_livecodebench, load_mbpp
from megatron_rlhf.evaluation.ability.loaders.ifeval import load_ifeval
from megatron_rlhf.evaluation.ability.loaders.math import load_gsm8k, load_math
from megatron_rlhf.evaluation.ability.suite import FORMAT_GRADERS, TaskSpec

LOADERS: dict[str, Callable[..., LoadedTask]] = {
    "math": load_math, "gsm8k": load_gsm8k, "gpqa": load_gpqa, "mmlu": load_mmlu,
    "humaneval": load_humaneval, "mbpp": load_mbpp, "livecodebench": load_livecodebench, "ifeval": load_ifeval,
}
assert set(LOADERS) == set(FORMAT_GRADERS), "every format has a loader"


def load_task(task: TaskSpec) -> LoadedTask:
    """The items of ``task`` (its first ``limit`` gradable ones); ValueError when none is left."""
    loaded = LOADERS[task.format](task.path, task.name)
    if task.limit is not None:
        loaded.items = loaded.items[: task.limit]
    if not loaded.items:
        raise ValueError(f"task {task.name!r}: {task.path} holds no gradable {task.format} item "
                         f"(skipped: {loaded.skipped or 'none'})")
    return loaded
