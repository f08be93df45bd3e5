"""Evaluation suite: which tasks (local files in public formats) measure which ability dimension.

YAML layout (unknown keys are errors; paths are relative to the suite file)::

    name: my-suite                      # optional; default: the file's stem
    chat_template: true                 # render prompts with the policy's chat template
    decoding: {greedy: true, samples: 4, temperature: 0.7, top_p: 1.0, max_new_tokens: 512, seed: 0}
    engine: {max_model_len: 2048, dtype: bfloat16, tensor_parallel: 1, prompts_per_call: 512}
    graders:                            # optional verifier settings, by grader
      code: {limits: {wall_seconds: 10}, sandbox: {max_concurrency: 4}}
    tasks:
      math500: {format: math, path: data/math500.jsonl, dimension: stem}
      gsm8k:   {format: gsm8k, path: data/gsm8k_test.jsonl, dimension: logic, limit: 200}

Dimensions are those of the Seed paper's Table 1: :data:`DIMENSIONS`. Formats and the grader
each uses: :data:`FORMAT_GRADERS`. Every error names the suite file and the key path. This module
reads no data file (the loaders do) and imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

DIMENSIONS = ("logic", "instruction_following", "stem", "coding", "nlp", "knowledge",
              "context_understanding", "ood")
"""The Seed paper's abilities: logical reasoning, instruction following, STEM, coding, NLP,
knowledge, context understanding, out-of-distribution generalisation."""

FORMAT_GRADERS = {
    "math": "math", "gsm8k": "math",
    "gpqa": "multiple_choice", "mmlu": "multiple_choice",
    "humaneval": "code", "mbpp": "code", "livecodebench": "code",
    "ifeval": "instruction_following",
}
"""Public file format -> the verifier that grades its answers."""

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DecodingConfig:
    greedy: bool = True
    """Grade one greedy (temperature 0) answer per item: the headline score."""
    samples: int = 0
    """Sampled answers per item (0: none); their mean accuracy estimates pass@1 at ``temperature``."""
    temperature: float = 0.7
    """Sampling temperature of the sampled answers (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling of the sampled answers, in (0, 1]."""
    max_new_tokens: int = 512
    """Longest answer, in tokens (>= 1)."""
    seed: int = 0
    """Engine and sampling seed."""

    def __post_init__(self) -> None:
        if not self.greedy and self.samples < 1:
            raise ValueError("greedy is false and samples is 0: nothing would be generated")
        if self.samples < 0 or self.max_new_tokens < 1:
            raise ValueError(f"samples={self.samples} must be >= 0 and max_new_tokens={self.max_new_tokens} >= 1")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature={self.temperature} must be > 0 and top_p={self.top_p} in (0, 1]")

    @property
    def metric(self) -> str:
        """The headline metric: ``greedy_accuracy`` when greedy answers are graded, else ``sampled_accuracy``."""
        return "greedy_accuracy" if self.greedy else "sampled_accuracy"


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 2048
    """Longest prompt + answer the engine holds, in tokens; longer prompts are dropped and counted."""
    dtype: str = "bfloat16"
    """float32 | bfloat16 | float16: the engine's weight dtype."""
    tensor_parallel: int = 1
    """vLLM tensor parallel size."""
    prompts_per_call: int = 512
    """Items sent to the engine per request (bounds the memory held by one request's answers)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} (choose {', '.join(DTYPES)})")
        if self.max_model_len < 2 or self.tensor_parallel < 1 or self.prompts_per_call < 1:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2, tensor_parallel={self.tensor_parallel} "
                             f"and prompts_per_call={self.prompts_per_call} >= 1")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    """The task's key under ``tasks``."""
    format: str
    """A key of :data:`FORMAT_GRADERS`."""
    path: Path
    """The data file (resolved against the suite file's folder)."""
    dimension: str
    """One of :data:`DIMENSIONS`."""
    limit: int | None = None
    """Evaluate only the first ``limit`` items (in file order); None: all."""

    @property
    def grader(self) -> str:
        return FORMAT_GRADERS[self.format]


@dataclass(frozen=True)
class SuiteConfig:
    name: str
    """Shown in the report."""
    tasks: tuple[TaskSpec, ...]
    """At least one task; names are unique."""
    decoding: DecodingConfig = DecodingConfig()
    engine: EngineConfig = EngineConfig()
    chat_template: bool = True
    """Render prompts with the policy's chat template (False: raw text, completion style)."""
    graders: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Grader name -> fields of its verifier config (see :mod:`.grading`)."""

    def dimensions(self) -> list[str]:
        """The dimensions measured, in :data:`DIMENSIONS` order."""
        used = {task.dimension for task in self.tasks}
        return [dimension for dimension in DIMENSIONS if dimension in used]


def suite_from_mapping(data: Any, where: str, base_dir: Path) -> SuiteConfig:
    """Validate a parsed suite document; ValueError naming ``where`` and the key path."""
    from megatron_rlhf.rewards.reward_config import dataclass_from_mapping

    if not isinstance(data, dict):
        raise ValueError(f"{where}: the suite must be a mapping with 'tasks', got {type(data).__name__}")
    known = {"name", "chat_template", "decoding", "engine", "graders", "tasks"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    tasks_data = data.get("tasks")
    if not isinstance(tasks_data, dict) or not tasks_data:
        raise ValueError(f"{where}: 'tasks' must map each task name to {{format, path, dimension}}")
    tasks = tuple(_task(str(name), spec, f"{where}: tasks.{name}", base_dir) for name, spec in tasks_data.items())
    name = data.get("name", Path(where).stem)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: name must be a non-empty string, got {name!r}")
    chat_template = data.get("chat_template", True)
    if not isinstance(chat_template, bool):
        raise ValueError(f"{where}: chat_template must be true or false, got {chat_template!r}")
    graders = data.get("graders", {})
    graders_used = {task.grader for task in tasks}
    if not isinstance(graders, dict) or not all(isinstance(value, dict) for value in graders.values()):
        raise ValueError(f"{where}: graders must map a grader name to its settings, got {graders!r}")
    unknown_graders = sorted(set(graders) - set(FORMAT_GRADERS.values()))
    if unknown_graders:
        raise ValueError(f"{where}: graders: unknown grader(s) {unknown_graders}; "
                         f"known: {sorted(set(FORMAT_GRADERS.values()))}")
    from megatron_rlhf.evaluation.ability.grading import grader_config

    for grader, settings in graders.items():
        if grader in graders_used:
            grader_config(grader, settings, f"{where}: graders.{grader}")  # validated now, before any start-up
    return SuiteConfig(
        name=name, tasks=tasks, chat_template=chat_template, graders=graders,
        decoding=dataclass_from_mapping(DecodingConfig, data.get("decoding", {}), f"{where}: decoding"),
        engine=dataclass_from_mapping(EngineConfig, data.get("engine", {}), f"{where}: engine"),
    )


def _task(name: str, spec: Any, where: str, base_dir: Path) -> TaskSpec:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected {{format, path, dimension}}, got {spec!r}")
    allowed = {"format", "path", "dimension", "limit"}
    unknown = sorted(set(spec) - allowed)
    missing = sorted({"format", "path", "dimension"} - set(spec))
    if unknown or missing:
        raise ValueError(f"{where}: unknown key(s) {unknown} / missing key(s) {missing}; allowed: {sorted(allowed)}")
    if spec["format"] not in FORMAT_GRADERS:
        raise ValueError(f"{where}.format: unknown format {spec['format']!r}; known: {', '.join(FORMAT_GRADERS)}")
    if spec["dimension"] not in DIMENSIONS:
        raise ValueError(f"{where}.dimension: {spec['dimension']!r} is not a dimension; choose {', '.join(DIMENSIONS)}")
    limit = spec.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{where}.limit: must be a positive integer, got {limit!r}")
    if not isinstance(spec["path"], str) or not spec["path"]:
        raise ValueError(f"{where}.path: must be a file path, got {spec['path']!r}")
    path = Path(spec["path"]).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        raise FileNotFoundError(f"{where}.path: {path} does not exist")
    return TaskSpec(name=name, format=spec["format"], path=path, dimension=spec["dimension"], limit=limit)


def load_suite(path: str | Path) -> SuiteConfig:
    """Read a suite YAML file (the `eval` command calls this)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    return suite_from_mapping(data, str(path), path.resolve().parent)
