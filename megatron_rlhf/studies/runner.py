"""The shared study runner: output layout, resumable arms, what a study reports.

The registry of studies and :func:`~megatron_rlhf.studies.lab.run_studies` are in :mod:`.lab`.

Layout under ``--out`` (default ``outputs/studies``)::

    recipe.json                  the recipe every study of this folder ran with
    shared/                      tokenizer, tiny base models, data sets (made once, marked done)
    <study>/arms/<arm>.json      one arm's measured result: its presence marks the arm done
    <study>/arms/<arm>/          the arm's own files (reward model, RL run, ...)
    <study>/report.{md,png,json} the study's report (rewritten from the arm files on every run)

    shared/arms/<digest>.json    a keyed arm's result (:meth:`StudyContext.shared_arm`), its files
    shared/arms/<digest>/        beside it and its key in ``<digest>.key.json`` (``{"layout": 2, "key": ...}``)

Guarantees: an arm whose result file exists is never rerun (a killed study continues with the
next arm; a killed RL arm also resumes from its own checkpoints); a result file is written
atomically (temporary name, then rename), so a half-written one cannot mark an arm done; a folder
made with another recipe is refused (``--restart`` clears the studies asked for and the keyed arms
they ran, never the rest of ``shared/`` nor other studies). Every arm is seeded from the recipe's
seed and the arm's name, a keyed arm from the recipe's seed and its key: studies of one folder
that ask for the same keyed arm (same key, hence the same run, seed included) run it once.

Seeds never depend on where the folder is: a key names its inputs logically (a data role such as
``prompts_train_verified``, a model size, the study and arm that made a file), never by path, and
:meth:`StudyContext.shared_arm` refuses a key holding a path of the folder or any absolute path. So
the same recipe gives the same seeds, arms and numbers under any ``--out``; within one folder a
logical name stands for one file (the recipe, fixed per folder, makes it), so equal keys are
equal runs. Key files without ``"layout": 2`` come from an older release that keyed arms by path
(:func:`is_current_key_file`; :func:`~megatron_rlhf.studies.lab.run_studies` refuses such a folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_rlhf.studies.recipe import StudyRecipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyContext:
    """What a study function gets: the recipe and where to put things."""

    name: str
    recipe: StudyRecipe
    out_dir: Path
    """This study's folder."""
    shared_dir: Path
    """Assets shared by every study of the output folder."""

    def arm(self, arm_name: str, compute: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """The result of arm ``arm_name``: read from its file when done earlier, else
        ``compute(arm_dir)`` (JSON-able), recorded with its seconds and written atomically."""
        result_file = self.out_dir / "arms" / f"{arm_name}.json"
        if result_file.is_file():
            log.info("study %s: arm %s done earlier (%s)", self.name, arm_name, result_file)
            return json.loads(result_file.read_text())
        return self._compute(arm_name, result_file, self.out_dir / "arms" / arm_name, compute)

    def shared_arm(self, arm_name: str, key: dict[str, Any], compute: Callable[[Path, int], dict[str, Any]]
                   ) -> dict[str, Any]:
        """:meth:`arm`, for an arm whose result is fixed by the recipe and ``key`` (JSON-able: every
        input of the run besides the recipe, named logically: see :meth:`check_key_is_path_free`),
        seeded from the key: read from this study's result file, else from the folder's result of
        the same key (another study ran the same arm), else ``compute(arm_dir, seed)`` in
        ``shared/arms/<digest>/``. This study's result file is a copy."""
        result_file = self.out_dir / "arms" / f"{arm_name}.json"
        if result_file.is_file():
            log.info("study %s: arm %s done earlier (%s)", self.name, arm_name, result_file)
            return json.loads(result_file.read_text())
        self.check_key_is_path_free(key)
        canonical = json.dumps(key, sort_keys=True)
        digest = key_digest(key)
        shared_file = self.shared_dir / "arms" / f"{digest}.json"
        if shared_file.is_file():
            log.info("study %s: arm %s is the run %s another study made (%s)", self.name, arm_name, digest, shared_file)
            result = json.loads(shared_file.read_text())
        else:
            shared_file.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomically(shared_file.with_suffix(".key.json"), {"layout": KEY_LAYOUT, "key": key})
            seed = self.key_seed(canonical)
            result = self._compute(arm_name, shared_file, shared_file.with_suffix(""),
                                   lambda arm_dir: compute(arm_dir, seed))
        result = {**result, "shared_arm": digest}
        result_file.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(result_file, result)
        return result

    def _compute(self, arm_name: str, result_file: Path, arm_dir: Path,
                 compute: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        arm_dir.mkdir(parents=True, exist_ok=True)
        log.info("study %s: arm %s starting", self.name, arm_name)
        started = time.perf_counter()
        result = dict(compute(arm_dir))
        result["seconds"] = round(time.perf_counter() - started, 1)
        _write_json_atomically(result_file, result)
        log.info("study %s: arm %s done in %.0f s", self.name, arm_name, result["seconds"])
        return result

    def seed(self, arm_name: str) -> int:
        """A seed of its own for each arm, stable across runs and output folders: from the recipe's
        seed and the study's and arm's names only."""
        import zlib

        return self.recipe.seed * 1000 + zlib.crc32(f"{self.name}/{arm_name}".encode()) % 1000

    def key_seed(self, canonical_key: str) -> int:
        """The seed of a keyed arm (:meth:`shared_arm`): the same for the same key in every study."""
        import zlib

        return self.recipe.seed * 1000 + zlib.crc32(f"keyed/{canonical_key}".encode()) % 1000

    def check_key_is_path_free(self, key: Any) -> None:
        """Raise ValueError if ``key`` holds a string that is an absolute path, a path inside this
        output folder or an existing path: a key (hence a seed) names its inputs logically (see the
        module docstring; logical names join their parts with ``:``, not ``/``)."""
        folders = {str(self.out_dir), str(self.shared_dir), str(self.shared_dir.parent)} - {"", "."}
        for value in _strings(key):
            inside = any(value.startswith(folder + os.sep) for folder in folders)
            if inside or os.path.isabs(value) or (os.sep in value and os.path.exists(value)):
                raise ValueError(f"study {self.name}: a keyed arm's key names its inputs logically (a data role, "
                                 f"a model size, an arm), not by path; got {value!r} in {key}")


KEY_LAYOUT = 2
"""Layout of ``shared/arms/<digest>.key.json``: 2 = ``{"layout": 2, "key": <path-free key>}``."""


def key_digest(key: dict[str, Any]) -> str:
    """The name of a keyed arm's run in ``shared/arms/``: a digest of its (path-free) key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def is_current_key_file(path: Path) -> bool:
    """Whether the key file ``path`` was written by this layout (older ones keyed arms by path)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("layout") == KEY_LAYOUT


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _strings(item)]
    return []


def _write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    temporary.replace(path)


@dataclass
class StudyResult:
    """What a study reports: a table, curves for the plot, and verdicts against the paper."""

    title: str
    source: str
    """The paper and section the claim comes from."""
    columns: list[str]
    rows: list[list[Any]]
    plot_x_label: str
    plot_y_label: str
    curves: dict[str, tuple[list[float], list[float]]]
    """Curve name -> (x values, y values)."""
    verdicts: list[Any]
    """trend.Verdict per claim."""
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    """Every arm's full result (the JSON report keeps them)."""
    log_x: bool = True


@dataclass(frozen=True)
class Study:
    name: str
    summary: str
    run: Callable[[StudyContext], StudyResult]
    uses_rl: bool
