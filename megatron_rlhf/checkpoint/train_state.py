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
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_rlhf.checkpoint.dist_ckpt import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
COMPLETE_FILE = "COMPLETE"
STATE_FILE = "train_state.json"
EXTRA_STATE_FILE = "extra_state.pt"
FORMAT_VERSION = 1
TMP_INFIX = ".tmp-"
OPTIMIZER_SHARDING = "dp_reshardable"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
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
    :class:`~megatron_rlhf.trainer.megatron_step.MegatronUpdater` (model + optimizer + LR
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
    from megatron.core import dist_checkpointing

    for name, component in models.items():
        dist_checkpointing.save(_sharded_state(component, False), str(staging / "models" / name))
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


def _is_updater(component: Any) -> bool:
    return all(
        hasattr(component, name) for name in ("model", "optimizer", "scheduler", "skipped_steps")
    )


def _module_of(component: Any) -> torch.nn.Module:
    """The model whose ``sharded_state_dict`` is saved (a DDP wrapper unwrapped)."""
    model = component.model if _is_updater(component) else component
    return model.module if hasattr(model, "ddp_config") else model


def _sharded_state(component: Any, is_loading: bool) -> dict[str, Any]:
    metadata = {
        "distrib_optim_sharding_type": OPTIMIZER_SHARDING,
        "chained_optim_avoid_prefix": True,
    }
    model_state = _module_of(component).sharded_state_dict(metadata=metadata)
    if not _is_updater(component):
        return {"model": model_state}
    _materialise_optimizer_state(component.optimizer)
    optimizer_state = component.optimizer.sharded_state_dict(
        model_state, is_loading=is_loading, metadata=metadata
    )
    return {"model": model_state, "optimizer": optimizer_state}


# Megatron-Core 0.16 with torch's Adam/SGD (no Apex/Transformer Engine: CPU, some GPU installs)
# needs three corrections to round-trip optimizer state exactly.


def _inner_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed_optimizer(optimizer: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(inner, DistributedOptimizer) for inner in _inner_optimizers(optimizer))


def _materialise_optimizer_state(optimizer: Any) -> None:
    """Create the zero state torch makes at a first step (Adam: moments, step 0; SGD: momentum
    buffers) in a never-stepped optimizer: Megatron can neither save an empty torch Adam state
    nor load into one. A zero SGD buffer gives the first step (dampening 0) the same update, bit
    for bit, as a missing one; Megatron's SGD lacks the state initialiser that loading calls, so
    a no-op one is set (the state exists by then)."""
    for inner in _inner_optimizers(optimizer):
        torch_optimizer = inner.optimizer
        if isinstance(torch_optimizer, torch.optim.SGD):
            inner.init_state_fn = inner.init_state_fn or (lambda *args, **kwargs: None)
            for group in torch_optimizer.param_groups:
                for parameter in group["params"] if group["momentum"] else []:
                    torch_optimizer.state[parameter].setdefault(
                        "momentum_buffer", torch.zeros_like(parameter)
                    )
        elif inner.init_state_fn is not None and len(torch_optimizer.state) == 0:
            inner.init_state_fn(torch_optimizer, inner.config)
            if isinstance(torch_optimizer, torch.optim.Adam):  # Apex/TE Adam keep no "step"
                for parameter_state in torch_optimizer.state.values():
                    parameter_state.setdefault("step", torch.tensor(0.0))


def _saved_adam_steps(optimizer: Any, loaded: Any) -> list[float | None]:
    """Per chained optimizer, the Adam step of a distributed-optimizer checkpoint (None else).

    Also puts back step 0 where a non-distributed checkpoint saved before the first step lacks
    it (Megatron saves the common step only when it is non-zero)."""
    inners = _inner_optimizers(optimizer)
    steps: list[float | None] = []
    for inner, state in zip(
        inners,
        [loaded] if len(inners) == 1 else [loaded[i] for i in range(len(inners))],
    ):
        if "param_state" in state:
            found = {group.get("step") for group in state["optimizer"]["param_groups"]} - {None}
            steps.append(float(found.pop()) if len(found) == 1 else None)
            continue
        steps.append(None)
        torch_state = state.get("optimizer", state).get("state", {})
        if "common_step" not in torch_state and isinstance(inner.optimizer, torch.optim.Adam):
            for parameter_state in torch_state.values():
                parameter_state.setdefault("step", torch.tensor(0.0))
    return steps


def _restore_adam_steps(optimizer: Any, saved_steps: list[float | None]) -> None:
    """Give every parameter its own, correct Adam ``step`` after a load. The distributed
    optimizer loads one ``step`` tensor shared by all parameters, then overwrites it with the
    loading template's 0; torch Adam would also add 1 to a shared tensor once per parameter."""
    for inner, step in zip(_inner_optimizers(optimizer), saved_steps):
        for parameter_state in inner.optimizer.state.values():
            current = parameter_state.get("step")
            if isinstance(current, torch.Tensor):
                value = current if step is None else torch.tensor(step, dtype=current.dtype)
                parameter_state["step"] = value.clone()


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


def _write_complete_marker(staging: Path, step: int) -> None:
    """Fsync every file, then record their sizes in ``COMPLETE`` (written last, fsynced)."""
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        _fsync(path)
        files[str(path.relative_to(staging))] = path.stat().st_size
    marker = staging / COMPLETE_FILE
    marker.write_text(
        json.dumps({"format_version": FORMAT_VERSION, "step": step, "files": files}, indent=1)
    )
    _fsync(marker)
    for directory in sorted({p for p in staging.rglob("*") if p.is_dir()} | {staging}):
        _fsync(directory)


def _publish_directory(staging: Path, final: Path) -> None:
    """Atomically rename ``staging`` to ``final``; an existing ``final`` is moved aside first."""
    replaced = final.with_name(f"{final.name}{TMP_INFIX}replaced-{uuid.uuid4().hex}")
    if final.exists():
        final.rename(replaced)
    staging.rename(final)
    _fsync(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def _write_latest_marker(checkpoints: Path, name: str) -> None:
    temporary = checkpoints / f"{LATEST_FILE}{TMP_INFIX}{uuid.uuid4().hex}"
    temporary.write_text(name + "\n")
    _fsync(temporary)
    os.replace(temporary, checkpoints / LATEST_FILE)
    _fsync(checkpoints)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(checkpoints: Path) -> list[Path]:
    """Delete ``*.tmp-*`` leftovers of killed saves or prunes. Call on one rank, between saves."""
    removed = sorted(checkpoints.glob(f"*{TMP_INFIX}*"))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        logger.info("removed stale temporary %s", path)
    return removed


def prune_checkpoints(checkpoints: Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints (rename, then delete)."""
    pruned = [path for _, path in complete_checkpoints(checkpoints.parent, quiet=True)[:-keep_last]]
    for path in pruned:
        doomed = path.with_name(f"{path.name}{TMP_INFIX}pruned-{uuid.uuid4().hex}")
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return pruned


def checkpoint_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete checkpoint, or None when it is."""
    match = _STEP_DIR.match(directory.name)
    if match is None:
        return f"name {directory.name!r} is not step_NNNNNN"
    marker = directory / COMPLETE_FILE
    if not marker.is_file():
        return f"no {COMPLETE_FILE} marker (an interrupted or foreign save)"
    try:
        record = json.loads(marker.read_text())
        step, version, files = (
            record["step"],
            record["format_version"],
            dict(record["files"]),
        )
    except (
        ValueError,
        KeyError,
        TypeError,
    ) as error:  # JSONDecodeError, UnicodeDecodeError
        return f"corrupt {COMPLETE_FILE} marker ({type(error).__name__}: {error})"
    if version != FORMAT_VERSION:
        return f"{COMPLETE_FILE} has format_version={version}; this version reads {FORMAT_VERSION}"
    if step != int(match.group(1)):
        return f"{COMPLETE_FILE} names step {step}, the directory step {int(match.group(1))}"
    for relative, size in files.items():
        path = directory / relative
        if not path.is_file():
            return f"file {relative} listed in {COMPLETE_FILE} is missing"
        if path.stat().st_size != size:
            return f"file {relative} has {path.stat().st_size} bytes, {COMPLETE_FILE} says {size}"
    return None


def complete_checkpoints(run_dir: str | Path, quiet: bool = False) -> list[tuple[int, Path]]:
    """``(step, directory)`` of the complete checkpoints under ``run_dir``, oldest first;
    others are skipped with a warning naming the reason (unless ``quiet``)."""
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    for path in sorted(checkpoints.glob("step_*")) if checkpoints.is_dir() else []:
        if TMP_INFIX in path.name or not path.is_dir():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            found.append((int(_STEP_DIR.match(path.name).group(1)), path))
        elif not quiet:
            logger.warning("ignoring checkpoint %s: %s", path, problem)
    return sorted(found)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir``, or None. Needs no process group."""
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    newest = found[-1][1]
    latest = Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE
    pointed = latest.read_text().strip() if latest.is_file() else None
    if pointed != newest.name:
        logger.warning(
            "%s names %r; the newest complete checkpoint is %s (its save was killed "
            "before updating %s): using it",
            latest,
            pointed,
            newest.name,
            LATEST_FILE,
        )
    return newest


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
