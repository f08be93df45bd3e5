"""Automatic step labels for process reward models, by Monte-Carlo rollouts (Math-Shepherd style).

For a solution cut into steps, the label of step ``k`` estimates how likely the policy still is
to reach a correct final answer after writing steps ``0..k`` (Wang et al. 2024, "Math-Shepherd";
used by the GLM "Does RLHF Scale?" study for its PRM). From each prefix ``steps[:k+1]`` the
policy writes ``m`` completions (one :meth:`RolloutEngine.generate` call per batch of prefixes,
``n = m``); a verifier grades prefix + completion; the *soft* label is the fraction graded
correct, the *hard* label 1 if any is. With ``final_step="verify"`` the last step is not rolled
out: its label is the verifier's grade of the whole solution (what the steps already say).

Input JSONL, one solution per line: ``{"id", "prompt", "steps": [str, ...], "ground_truth",
"domain"?}`` (``domain`` defaults to ``math``; no step may be empty or contain the separator).
Output JSONL, one line per labelled solution, in the step-labelled schema of
:mod:`megatron_rlhf.data.reward_data` (ready for PRM training)::

    {"id", "prompt", "steps", "step_labels": [soft or hard per step], "label": 0 | 1 | null,
     "domain", "ground_truth", "step_success_rates": [soft per step], "rollouts_per_step": m}

``label`` is the verifier's grade of the whole solution (null when the verifier could not grade
it and the last step was rolled out).

Context of a rollout: the prompt encoded as the policy saw it (``chat``: the tokenizer's chat
template with the generation prompt; ``plain``: the prompt text as the rollout engine encodes a
string), followed by ``separator.join(steps[:k+1]) + separator`` encoded as one piece of text.
The verifier sees ``response = prefix + completion`` (the whole solution for its own grade), with
``metadata = {"id", "step", "rollout", "completion"}``.

Guarantees: finished solutions are appended to the output and fsync'ed batch by batch; a rerun
skips ids already in the output (a torn last line from a crash is cut off and redone), so an
interrupted run resumes without relabelling or duplicating; completions the verifier could not
grade (INFRA_ERROR) are left out of a step's fraction, and a step with none graded leaves its
solution unlabelled (not written, counted, retried by a rerun); a solution whose longest context
does not fit the engine is skipped and counted, never truncated. Not guaranteed: labels are
Monte-Carlo estimates (standard error ``sqrt(p (1 - p) / m)``); reruns do not reproduce the same
samples unless the engine's seed and batch composition are the same.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from megatron_rlhf.data.jsonl import MalformedLine, ParsedDataset, RecordError, read_jsonl, require_str
from megatron_rlhf.rewards.sample import RewardResult, RewardSample, RewardStatus

log = logging.getLogger(__name__)
LABEL_TYPES = ("soft", "hard")
PROMPT_FORMATS = ("chat", "plain")
FINAL_STEP_MODES = ("verify", "rollout")


@dataclass(frozen=True)
class StepLabelConfig:
    rollouts_per_step: int = 8
    """Completions sampled from each step prefix (Math-Shepherd's N). >= 1."""
    label_type: str = "soft"
    """soft (fraction of completions graded correct) | hard (1 if any is): written as step_labels."""
    step_separator: str = "\n"
    """Joins the steps (and ends each prefix); must match the PRM's step separator. Non-empty."""
    prompt_format: str = "chat"
    """chat (the tokenizer's chat template, one user turn) | plain (the prompt text as is)."""
    final_step: str = "verify"
    """verify (label the last step with the verifier's grade of the whole solution) | rollout
    (roll out from the complete solution too)."""
    prefixes_per_batch: int = 64
    """Step prefixes per engine call (whole solutions are kept together; a solution with more
    steps forms a batch of its own). >= 1."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (> 0: the labels estimate the policy's success rate)."""
    top_p: float = 1.0
    max_new_tokens: int = 256
    """Longest completion, in tokens. >= 1."""
    seed: int | None = None
    """Per-request sampling seed (None: the engine's seeded stream; a fixed seed repeats the
    same random numbers for every prefix, correlating their labels)."""

    def __post_init__(self) -> None:
        for name, choices in (("label_type", LABEL_TYPES), ("prompt_format", PROMPT_FORMATS),
                              ("final_step", FINAL_STEP_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"step labels {name}={getattr(self, name)!r} (choose {choices})")
        for name in ("rollouts_per_step", "prefixes_per_batch", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"step labels {name} must be a positive integer, got {value!r}")
        if not isinstance(self.step_separator, str) or not self.step_separator:
            raise ValueError(f"step_separator must be a non-empty string, got {self.step_separator!r}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature!r} must be > 0 and top_p={self.top_p!r} in (0, 1]")


@dataclass(frozen=True)
class Solution:
    """One solution to label."""

    id: str
    prompt: str
    steps: tuple[str, ...]
    """Reasoning steps in order; none empty, none containing the separator."""
    ground_truth: Any
    """What the verifier checks against (a reference answer for math)."""
    domain: str = "math"


def parse_solution(record: Mapping[str, Any], separator: str = "\n") -> Solution:
    """A :class:`Solution` from one JSON object; RecordError naming the offending field."""
    solution_id = record["id"]
    if isinstance(solution_id, bool) or not isinstance(solution_id, (str, int)):
        raise RecordError(f"field 'id' must be a string or an integer, got {solution_id!r}")
    steps = record["steps"]
    if not isinstance(steps, list) or not steps:
        raise RecordError("field 'steps' must be a non-empty list of strings")
    for index, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise RecordError(f"steps[{index}] must be a non-empty string, got {step!r}")
        if separator in step:
            raise RecordError(f"steps[{index}] contains the step separator {separator!r}")
    if "ground_truth" not in record:
        raise RecordError("missing field 'ground_truth'")
    domain = require_str(record, "domain") if "domain" in record else "math"
    return Solution(str(solution_id), require_str(record, "prompt"), tuple(steps), record["ground_truth"], domain)


def read_solutions(path: str | Path, separator: str = "\n", strict: bool = True) -> ParsedDataset[Solution]:
    """Read a solutions file; malformed lines and repeated ids are reported as ``file:line: reason``."""
    parsed = read_jsonl(path, lambda record: parse_solution(record, separator), strict=False)
    seen: dict[str, int] = {}
    records, lines, malformed = [], [], list(parsed.malformed)
    for solution, line in zip(parsed.records, parsed.lines):
        if solution.id in seen:
            malformed.append(MalformedLine(parsed.path, line, f"id {solution.id!r} already used on line {seen[solution.id]}"))
            continue
        seen[solution.id] = line
        records.append(solution)
        lines.append(line)
    malformed.sort(key=lambda bad: bad.line)
    dataset = ParsedDataset(records, lines, malformed, parsed.path)
    if strict and malformed:
        from megatron_rlhf.data.jsonl import DatasetError

        raise DatasetError(f"{len(malformed)} malformed line(s):\n{dataset.report()}")
    return dataset


# -- rollout contexts ----------------------------------------------------------------------------


def prefix_text(steps: Sequence[str], k: int, separator: str) -> str:
    """Steps ``0..k`` joined, ending with the separator (the policy continues with step ``k + 1``)."""
    return separator.join(steps[: k + 1]) + separator


def rolled_out_steps(solution: Solution, config: StepLabelConfig) -> list[int]:
    """Indices of the steps whose prefixes are rolled out."""
    count = len(solution.steps)
    return list(range(count if config.final_step == "rollout" else count - 1))


def encode_policy_prompt(tokenizer: Any, prompt: str, prompt_format: str) -> list[int]:
    """The prompt's token ids as the policy saw them."""
    if prompt_format == "chat":
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=False))
    return list(tokenizer.encode(prompt, add_special_tokens=False))


def rollout_context_ids(tokenizer: Any, solution: Solution, k: int, config: StepLabelConfig) -> list[int]:
    """Token ids the policy continues from after step ``k``."""
    prefix = prefix_text(solution.steps, k, config.step_separator)
    return encode_policy_prompt(tokenizer, solution.prompt, config.prompt_format) + list(
        tokenizer.encode(prefix, add_special_tokens=False))


# -- labels (pure) -------------------------------------------------------------------------------


def grade_of(result: RewardResult) -> bool | None:
    """True: graded correct; False: graded wrong; None: the verifier could not grade it."""
    if result.status is RewardStatus.INFRA_ERROR:
        return None
    return result.passed


def step_success_rates(step_grades: Sequence[Sequence[bool | None]]) -> list[float | None]:
    """Per step, the fraction of graded completions that are correct (None when none was graded)."""
    rates: list[float | None] = []
    for grades in step_grades:
        graded = [grade for grade in grades if grade is not None]
        rates.append(sum(graded) / len(graded) if graded else None)
    return rates


def labelled_record(solution: Solution, step_grades: Sequence[Sequence[bool | None]],
                    solution_grade: bool | None, config: StepLabelConfig) -> dict[str, Any] | None:
    """The output record of one solution, or None when a step could not be labelled.

    ``step_grades[i]`` are the grades of the completions of rolled-out step ``i``
    (:func:`rolled_out_steps` order); with ``final_step="verify"`` the last step's label is
    ``solution_grade``.
    """
    rates = step_success_rates(step_grades)
    if config.final_step == "verify":
        rates.append(None if solution_grade is None else float(solution_grade))
    if len(rates) != len(solution.steps) or any(rate is None for rate in rates):
        return None
    labels = rates if config.label_type == "soft" else [1.0 if rate > 0 else 0.0 for rate in rates]
    return {
        "id": solution.id, "prompt": solution.prompt, "steps": list(solution.steps),
        "step_labels": labels, "label": None if solution_grade is None else int(solution_grade),
        "domain": solution.domain, "ground_truth": solution.ground_truth,
        "step_success_rates": rates, "rollouts_per_step": config.rollouts_per_step,
    }


def plan_batches(solutions: Sequence[Solution], config: StepLabelConfig) -> list[list[Solution]]:
    """Consecutive solutions grouped so that a group rolls out at most ``prefixes_per_batch``
    prefixes (a solution with more forms a group of its own)."""
    groups: list[list[Solution]] = []
    current: list[Solution] = []
    used = 0
    for solution in solutions:
        needed = len(rolled_out_steps(solution, config))
        if current and used + needed > config.prefixes_per_batch:
            groups.append(current)
            current, used = [], 0
        current.append(solution)
        used += needed
    if current:
        groups.append(current)
    return groups


# -- resumable output ----------------------------------------------------------------------------


def completed_ids(path: str | Path) -> set[str]:
    """Ids already labelled in ``path`` (empty when it does not exist).

    A last line without its newline (a write cut by a crash) is removed from the file; any other
    line that is not a JSON object with an ``id`` raises ValueError naming ``file:line``.
    """
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: removing an unfinished last line (%d bytes) left by an interrupted run", path, len(data) - cut)
        with path.open("r+b") as handle:
            handle.truncate(cut)
        data = data[:cut]
    done = set()
    for line_number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            done.add(str(record["id"]))
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"{path}:{line_number}: not a step-label record with an 'id'; "
                             "is --output another file?") from None
    return done


class StepLabelWriter:
    """Appends records to the output JSONL, flushed and fsync'ed after each batch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        for record in records:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


# -- the labelling loop --------------------------------------------------------------------------


@dataclass
class StepLabelStats:
    solutions: int = 0
    """Solutions in the input."""
    already_done: int = 0
    """Skipped because the output already has their id."""
    labelled: int = 0
    skipped_too_long: int = 0
    """Skipped: a rollout context does not fit the engine's prompt limit."""
    unlabelled_infra_errors: int = 0
    """Not written: a step had no completion the verifier could grade."""
    rollouts: int = 0
    """Completions sampled."""
    infra_errors: int = 0
    """Verifier results that were INFRA_ERROR."""
    skipped_ids: list[str] = field(default_factory=list)


def label_solutions(solutions: Sequence[Solution], engine: Any, verifier: Any, config: StepLabelConfig,
                    output_path: str | Path, show_progress: bool = True) -> StepLabelStats:
    """Label ``solutions`` (skipping ids already in ``output_path``) and append them to it.

    ``engine`` is a :class:`~megatron_rlhf.rollout.engine.RolloutEngine` holding the policy;
    ``verifier`` any :class:`~megatron_rlhf.rewards.interface.RewardSource` (e.g. the router).
    """
    from tqdm import tqdm

    from megatron_rlhf.config.sampling import SamplingSettings

    stats = StepLabelStats(solutions=len(solutions))
    done = completed_ids(output_path)
    todo = [solution for solution in solutions if solution.id not in done]
    stats.already_done = len(solutions) - len(todo)
    settings = SamplingSettings(n=config.rollouts_per_step, temperature=config.temperature, top_p=config.top_p,
                                max_new_tokens=config.max_new_tokens, seed=config.seed)
    limit = engine.config.max_prompt_tokens or (engine.config.max_model_len - config.max_new_tokens)
    writer = StepLabelWriter(output_path)
    try:
        with tqdm(total=len(todo), desc="step labels", unit="solution", disable=not show_progress) as progress:
            for group in plan_batches(todo, config):
                records = _label_group(group, engine, verifier, config, settings, limit, stats)
                writer.append(records)
                stats.labelled += len(records)
                progress.update(len(group))
    finally:
        writer.close()
    return stats


def _label_group(group: list[Solution], engine: Any, verifier: Any, config: StepLabelConfig,
                 settings: Any, limit: int, stats: StepLabelStats) -> list[dict[str, Any]]:
    contexts: list[list[int]] = []
    owners: list[tuple[int, int]] = []  # (solution index in group, step) per context
    admitted: list[int] = []
    for position, solution in enumerate(group):
        ids = {k: rollout_context_ids(engine.tokenizer, solution, k, config) for k in rolled_out_steps(solution, config)}
        if any(len(context) > limit for context in ids.values()):
            stats.skipped_too_long += 1
            stats.skipped_ids.append(solution.id)
            log.warning("solution %r: a rollout context is longer than the engine's %d-token limit; skipped",
                        solution.id, limit)
            continue
        admitted.append(position)
        for k, context in ids.items():
            contexts.append(context)
            owners.append((position, k))
    completions: dict[tuple[int, int], list[str]] = {owner: [] for owner in owners}
    if contexts:
        batch = engine.generate(contexts, settings)
        lengths = batch.response_lengths.tolist()
        for row, request in enumerate(batch.prompt_index.tolist()):
            token_ids = batch.response_ids[row, : lengths[row]].tolist()
            completions[owners[request]].append(engine.tokenizer.decode(token_ids, skip_special_tokens=True))
        stats.rollouts += batch.num_samples
    samples, keys = [], []
    for (position, k), texts in completions.items():
        solution = group[position]
        prefix = prefix_text(solution.steps, k, config.step_separator)
        for j, completion in enumerate(texts):
            samples.append(_sample(solution, f"{solution.id}/step{k}/{j}", prefix + completion,
                                   {"step": k, "rollout": j, "completion": completion}))
            keys.append((position, k))
    for position in admitted:
        solution = group[position]
        samples.append(_sample(solution, f"{solution.id}/solution", config.step_separator.join(solution.steps),
                               {"step": None, "completion": ""}))
        keys.append((position, None))
    results = verifier.score(samples) if samples else []
    grades: dict[tuple[int, int | None], list[bool | None]] = {}
    for key, result in zip(keys, results, strict=True):  # a RewardSource returns one result per sample
        grade = grade_of(result)
        stats.infra_errors += grade is None
        grades.setdefault(key, []).append(grade)
    records = []
    for position in admitted:
        solution = group[position]
        step_grades = [grades.get((position, k), []) for k in rolled_out_steps(solution, config)]
        record = labelled_record(solution, step_grades, grades[(position, None)][0], config)
        if record is None:
            stats.unlabelled_infra_errors += 1
            stats.skipped_ids.append(solution.id)
        else:
            records.append(record)
    return records


def _sample(solution: Solution, sample_id: str, response: str, metadata: dict[str, Any]) -> RewardSample:
    return RewardSample(sample_id=sample_id, domain=solution.domain, prompt=solution.prompt, response=response,
                        ground_truth=solution.ground_truth, metadata={"id": solution.id, **metadata})
