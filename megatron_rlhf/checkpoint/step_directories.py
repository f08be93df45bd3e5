"""Checkpoint directories that are complete or ignored: atomic publish, markers, discovery.

Layout under a run directory: ``checkpoints/step_NNNNNN/`` (one complete checkpoint each, with a
``COMPLETE`` JSON marker listing every file and its size, written and fsynced last),
``checkpoints/latest`` (the newest name, for people and tools) and, transiently,
``*.tmp-*`` staging, replaced or pruned entries.

Guarantees: :func:`publish_directory` renames a fully written staging directory into place
atomically; :func:`write_latest_marker` replaces ``latest`` atomically; discovery
(:func:`complete_checkpoints`, :func:`find_latest_checkpoint`) trusts only directories whose
marker parses, names their step and matches the files on disk, so a save killed at any point
leaves the previous or the new checkpoint as the newest valid one; :func:`prune_checkpoints`
renames before deleting, so no half-deleted ``step_*`` exists. Needs no process group.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
COMPLETE_FILE = "COMPLETE"
FORMAT_VERSION = 1
TMP_INFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def write_complete_marker(staging: Path, step: int) -> None:
    """Fsync every file, then record their sizes in ``COMPLETE`` (written last, fsynced)."""
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        fsync_path(path)
        files[str(path.relative_to(staging))] = path.stat().st_size
    marker = staging / COMPLETE_FILE
    marker.write_text(
        json.dumps({"format_version": FORMAT_VERSION, "step": step, "files": files}, indent=1)
    )
    fsync_path(marker)
    for directory in sorted({p for p in staging.rglob("*") if p.is_dir()} | {staging}):
        fsync_path(directory)


def publish_directory(staging: Path, final: Path) -> None:
    """Atomically rename ``staging`` to ``final``; an existing ``final`` is moved aside first."""
    replaced = final.with_name(f"{final.name}{TMP_INFIX}replaced-{uuid.uuid4().hex}")
    if final.exists():
        final.rename(replaced)
    staging.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def write_latest_marker(checkpoints: Path, name: str) -> None:
    temporary = checkpoints / f"{LATEST_FILE}{TMP_INFIX}{uuid.uuid4().hex}"
    temporary.write_text(name + "\n")
    fsync_path(temporary)
    os.replace(temporary, checkpoints / LATEST_FILE)
    fsync_path(checkpoints)


def fsync_path(path: Path) -> None:
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
