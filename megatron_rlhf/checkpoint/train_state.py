"""Resumable training state: models, optimizers, LR schedules, RNG streams and loop state.

:func:`save_train_state` writes everything a training loop needs to continue as if it had never
stopped; :func:`load_latest_train_state` restores the newest complete checkpoint in place::

    <run_dir>/checkpoints/step_000012/
        models/<name>/        Megatron-Core distributed checkpoint (torch_dist) of the model and,
                              for a MegatronUpdater, its optimizer (distributed optimizer in the
                              ``dp_reshardable`` format: fp32 main params + Adam moments)
        train_state.json      step, world size, TP/PP/EP sizes; per model: LR-scheduler state,
                              optimizer-step and skipped-step counters
        rng/rank_00000.pt     per rank: Python, NumPy, torch CPU (+ CUDA) generators and
                              Megatron's RNG-tracker streams, with the rank's TP/PP/DP place
        extra_state.pt        the loop's state (data position, normalisers, KL controller,
                              metrics history): rank 0's copy
        COMPLETE              JSON: step, format version, size of every file above
    <run_dir>/checkpoints/latest   name of the newest checkpoint, for people and tools

Guarantees:

* Complete or ignored. All ranks write into ``step_000012.tmp-<uuid>``; after a barrier rank 0
  fsyncs every file, writes ``COMPLETE`` last, renames the directory to ``step_000012`` (atomic),
  then replaces ``latest`` atomically (tmp file + ``os.replace``). SIGKILL at any point leaves
  either the previous checkpoint or the new complete one as the newest valid checkpoint.
* Loaders trust directories, not ``latest``: they take the newest ``step_*`` whose ``COMPLETE``
  parses, names that step and lists files present with their recorded sizes; ``*.tmp-*`` and
  directories with a missing or bad marker are skipped with a log line. (A kill between the rename
  and the ``latest`` update thus resumes from the new, complete checkpoint.) Each save first
  deletes stale ``*.tmp-*`` entries; ``keep_last`` newest complete checkpoints are kept, older ones
  are renamed to ``*.tmp-*`` before deletion so that no half-deleted ``step_*`` can exist.
* At the same layout and world size, resume is bitwise: parameters, Adam moments and step, LR
  schedule, counters and every rank's RNG streams are restored exactly.

Not guaranteed:

* Another layout. The distributed optimizer's ``dp_reshardable`` format (Megatron-LM's default;
  ``fully_reshardable`` gathers through ``.cuda()`` and fails on CPU) loads at another DP size but
  not another TP/PP/EP size: that is refused with a ValueError. A non-distributed optimizer and
  bare models reshard freely. RNG streams are per rank: at another world size or place they stay
  as seeded (logged), so results are then not bitwise.
* Concurrent or asynchronous saves into one ``run_dir``; virtual pipeline chunks.
* Multi-node runs need ``run_dir`` on a filesystem shared by all ranks (as Megatron's distributed
  checkpointing does); durability then rests on its close-to-open consistency + rank 0's fsync.
* Megatron's checkpoint writer starts a multiprocessing Manager process; a SIGKILLed trainer
  leaves it orphaned (the launcher must clean up its process group).
* ``extra_state`` must be the same on every rank and hold only None/bool/int/float/str, tensors
  and lists/tuples/dicts of those (it is loaded with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_rlhf.checkpoint.dist_ckpt import CheckpointError, save_sharded
from megatron_rlhf.checkpoint.optimizer_state import (
    is_distributed_optimizer as _is_distributed_optimizer,
    is_updater as _is_updater,
    module_of as _module_of,
    restore_adam_steps as _restore_adam_steps,
    saved_adam_steps as _saved_adam_steps,
    sharded_state as _sharded_state,
)
from megatron_rlhf.checkpoint.step_directories import (  # noqa: F401 - public names re-exported
    CHECKPOINTS_DIR,
    COMPLETE_FILE,
    FORMAT_VERSION,
    LATEST_FILE,
    TMP_INFIX,
    checkpoint_problem,
    complete_checkpoints,
    find_latest_checkpoint,
    fsync_path as _fsync,
    prune_checkpoints,
    publish_directory as _publish_directory,
    remove_stale_temporaries,
    write_complete_marker as _write_complete_marker,
    write_latest_marker as _write_latest_marker,
)

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
EXTRA_STATE_FILE = "extra_state.pt"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_PLAIN_TYPES = (type(None), bool, int, float, str, torch.Tensor)


@dataclass(frozen=True)
class TrainStateInfo:
    """What :func:`load_latest_train_state` restored."""

    step: int
    """The training step the checkpoint was saved at."""
    directory: Path
    """The ``step_*`` directory that was loaded."""
    extra_state: dict[str, Any]
    """The ``extra_state`` given to :func:`save_train_state` (rank 0's, on every rank)."""
    rng_restored: bool
    """False when the world size or this rank's TP/PP/DP place differ from the saved ones
    (the RNG streams were then left as seeded)."""


def save_train_state(
    run_dir: str | Path,
    step: int,
    models: dict[str, Any],
    extra_state: dict[str, Any] | None = None,
    *,
    keep_last: int = 2,
) -> Path:
    """Save a complete, atomically published checkpoint; every rank must call it.

    ``models`` maps a name (``actor``, ``critic``...) to a
    :class:`~megatron_rlhf.training.megatron_step.MegatronUpdater` (model + optimizer + LR
    schedule + counters) or to a bare model (weights only). Returns the published directory.
    """
    extra_state = dict(extra_state or {})
    _check_save_arguments(step, models, extra_state, keep_last)
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    final = checkpoints / f"step_{step:06d}"

    def prepare() -> Path:
        checkpoints.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(checkpoints)
        staging = checkpoints / f"{final.name}{TMP_INFIX}{uuid.uuid4().hex}"
        for name in models:
            (staging / "models" / name).mkdir(parents=True)
        (staging / "rng").mkdir()
        return staging

    staging = _on_rank0(prepare)
    for name, component in models.items():
        save_sharded(_sharded_state(component, False), str(staging / "models" / name))
    _write_rng_state(staging / "rng" / f"rank_{torch.distributed.get_rank():05d}.pt")
    torch.distributed.barrier()

    def publish() -> Path:
        (staging / STATE_FILE).write_text(json.dumps(_state_record(step, models), indent=2))
        torch.save(extra_state, staging / EXTRA_STATE_FILE)
        _write_complete_marker(staging, step)
        _publish_directory(staging, final)
        _write_latest_marker(checkpoints, final.name)
        prune_checkpoints(checkpoints, keep_last)
        return final

    return _on_rank0(publish)


def _check_save_arguments(step: int, models: dict, extra_state: dict, keep_last: int) -> None:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be an int >= 0")
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    if not models:
        raise ValueError("models is empty: name at least one model or MegatronUpdater to save")
    for name, component in models.items():
        if not _MODEL_NAME.match(name):
            raise ValueError(f"model name {name!r} must match {_MODEL_NAME.pattern}")
        if not (_is_updater(component) or isinstance(component, torch.nn.Module)):
            raise TypeError(
                f"models[{name!r}] is a {type(component).__name__}, not a MegatronUpdater or model"
            )
    _check_plain(extra_state, "extra_state")
    if not torch.distributed.is_initialized():
        raise RuntimeError("save_train_state needs torch.distributed (initialize_parallel) first")


def _check_plain(value: Any, where: str) -> None:
    """Refuse at save time what ``torch.load(weights_only=True)`` could not load at resume."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} must be a str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN_TYPES):
        raise TypeError(
            f"{where} is a {type(value).__name__}; extra_state may hold only None, bool, int, "
            "float, str, tensors and lists/tuples/dicts of those (e.g. use dataclasses.asdict)"
        )


def _model_parallel_sizes() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "expert_parallel": ps.get_expert_model_parallel_world_size(),
    }


def _rank_place() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "rank": torch.distributed.get_rank(),
        "tensor_parallel_rank": ps.get_tensor_model_parallel_rank(),
        "pipeline_parallel_rank": ps.get_pipeline_model_parallel_rank(),
        "data_parallel_rank": ps.get_data_parallel_rank(),
        **_model_parallel_sizes(),
    }


def _state_record(step: int, models: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": torch.distributed.get_world_size(),
        "model_parallel": _model_parallel_sizes(),
        "models": {},
    }
    for name, component in models.items():
        record["models"][name] = {"kind": "model"}
        if _is_updater(component):
            record["models"][name] = {
                "kind": "updater",
                "distributed_optimizer": _is_distributed_optimizer(component.optimizer),
                "scheduler": component.scheduler.state_dict(),
                "optimizer_steps": component.steps,
                "skipped_steps": component.skipped_steps,
            }
    return record


def _write_rng_state(path: Path) -> None:
    import numpy
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    numpy_state = numpy.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (
            numpy_state[0],
            numpy_state[1].tolist(),
            *numpy_state[2:],
        ),  # weights_only-safe
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "megatron_tracker": get_cuda_rng_tracker().get_states(),
        "place": _rank_place(),
    }
    torch.save(state, path)
    _fsync(path)


def load_latest_train_state(run_dir: str | Path, models: dict[str, Any]) -> TrainStateInfo | None:
    """Restore the newest complete checkpoint under ``run_dir`` into ``models`` and the RNGs.

    Every rank calls it, with the names used at save time. Returns None, changing nothing,
    when there is no complete checkpoint.
    """
    directory = _on_rank0(lambda: find_latest_checkpoint(run_dir))
    return None if directory is None else load_train_state(directory, models)


def load_train_state(directory: str | Path, models: dict[str, Any]) -> TrainStateInfo:
    """Restore one ``step_*`` checkpoint directory; every rank calls it."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    problem = _on_rank0(lambda: checkpoint_problem(directory))
    if problem is not None:
        raise CheckpointError(f"{directory}: not a complete checkpoint: {problem}")
    record = json.loads((directory / STATE_FILE).read_text())
    _check_models_match(directory, record, models)
    for name, component in models.items():
        path = directory / "models" / name
        try:
            loaded = dist_checkpointing.load(_sharded_state(component, True), str(path))
        except Exception as error:  # Megatron raises several types for unreadable checkpoints
            raise CheckpointError(
                f"{path}: cannot load distributed checkpoint ({error})"
            ) from error
        _load_model_state(_module_of(component), loaded["model"], path)
        if _is_updater(component):
            _restore_updater(component, loaded["optimizer"], record["models"][name], path)
    extra_state = torch.load(directory / EXTRA_STATE_FILE, weights_only=True)
    rng_restored = _restore_rng_state(directory, record["world_size"])
    torch.distributed.barrier()
    logger.info("resumed from %s (step %d)", directory, record["step"])
    return TrainStateInfo(record["step"], directory, extra_state, rng_restored)


def _check_models_match(directory: Path, record: dict[str, Any], models: dict[str, Any]) -> None:
    saved = record["models"]
    if set(saved) != set(models):
        raise ValueError(
            f"{directory}: checkpoint holds models {sorted(saved)}; the caller passed "
            f"{sorted(models)}"
        )
    for name, component in models.items():
        kind = "updater" if _is_updater(component) else "model"
        if saved[name]["kind"] != kind:
            raise ValueError(
                f"{directory}: models[{name!r}] was saved as a {saved[name]['kind']}, got a {kind}"
            )
        if (
            kind == "updater"
            and saved[name]["distributed_optimizer"]
            and record["model_parallel"] != _model_parallel_sizes()
        ):
            raise ValueError(
                f"{directory}: saved at {record['model_parallel']}, this run is at "
                f"{_model_parallel_sizes()}; the distributed optimizer state of {name!r} reloads "
                "only at the same TP/PP/EP sizes (the data-parallel size may differ)"
            )


def _load_model_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: checkpoint does not match the model (missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]})"
        )


def _restore_updater(
    updater: Any, optimizer_state: Any, record: dict[str, Any], path: Path
) -> None:
    saved_steps = _saved_adam_steps(updater.optimizer, optimizer_state)
    with torch.no_grad():  # fp32 main params are views of the (grad-requiring) parameters
        updater.optimizer.load_state_dict(optimizer_state)
    _restore_adam_steps(updater.optimizer, saved_steps)
    try:
        updater.scheduler.load_state_dict(record["scheduler"])
    except AssertionError as error:  # Megatron asserts that the schedule settings are unchanged
        raise ValueError(
            f"{path}: the LR schedule differs from the checkpoint's ({error})"
        ) from error
    updater.steps = record["optimizer_steps"]
    updater.skipped_steps = record["skipped_steps"]


def _restore_rng_state(directory: Path, saved_world_size: int) -> bool:
    import numpy
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    path = directory / "rng" / f"rank_{torch.distributed.get_rank():05d}.pt"
    if saved_world_size != torch.distributed.get_world_size() or not path.is_file():
        logger.warning(
            "%s: saved with world size %d; RNG streams left as seeded",
            directory,
            saved_world_size,
        )
        return False
    state = torch.load(path, weights_only=True)
    if state["place"] != _rank_place():
        logger.warning(
            "%s: saved at %s, now at %s; RNG streams left as seeded",
            path,
            state["place"],
            _rank_place(),
        )
        return False
    version, keys, position, has_gauss, cached = state["numpy"]
    random.setstate(_as_tuples(state["python"]))
    numpy.random.set_state(
        (version, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, cached)
    )
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    get_cuda_rng_tracker().set_states(state["megatron_tracker"])
    return True


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` needs tuples where a round trip may have produced lists."""
    return tuple(_as_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value


def _on_rank0(action: Callable[[], Any]) -> Any:
    """Run ``action`` on rank 0 and broadcast its result, or its failure, to every rank."""
    outcome: list[Any] = [None, None]
    failure: Exception | None = None
    if torch.distributed.get_rank() == 0:
        try:
            outcome = [action(), None]
        except Exception as error:  # noqa: BLE001 - raised on every rank below
            failure, outcome = error, [None, f"{type(error).__name__}: {error}"]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise CheckpointError(f"checkpoint step failed on rank 0: {outcome[1]}")
    return outcome[0]
