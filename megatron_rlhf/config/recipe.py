"""Recipe files: YAML mappings that inherit from other recipe files through ``base:``.

A recipe may name one base file or a list of them (paths relative to the recipe's own folder),
for example a shared base and a model file::

    base: [../base/grpo.yaml, model.yaml]
    actor: {world_size: 16}

:func:`load_recipe` reads the bases first (recursively, left to right, later ones overriding
earlier ones), then the recipe's own keys, merging key by key: nested mappings merge
recursively; any other value (scalar, list, null) replaces the inherited one. The result is one
plain mapping without ``base``, ready for the typed loader of the trainer that reads it, which
rejects unknown keys as before (inheritance never admits a key the typed config lacks).

Errors (:class:`RecipeError`, a ``ValueError``) name the file and the key: a missing base, a
cycle of bases, a file that is not a mapping, a ``base`` that is not a path or list of paths.
Guarantees: no file is read twice within one chain; the merged mapping is a fresh copy (the
caller may change it). Imports only the standard library and PyYAML.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from megatron_rlhf.config.errors import ConfigError

BASE_KEY = "base"


class RecipeError(ConfigError):
    """A recipe file or one of its bases cannot be read or merged."""


def merge_mappings(inherited: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``inherited``, key by key; nested mappings merge recursively."""
    merged = copy.deepcopy(inherited)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_mappings(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_mapping(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _base_paths(data: dict[str, Any], path: Path) -> list[Path]:
    bases = data.get(BASE_KEY)
    if bases is None:
        return []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(item, str) and item for item in bases):
        raise RecipeError(f"{path}: key {BASE_KEY!r} must be a path or a list of paths, got {bases!r}")
    return [(path.parent / item).resolve() for item in bases]


def load_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged mapping of recipe ``path`` and its bases (module doc)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(item) for item in (*_chain, path))
        raise RecipeError(f"recipe bases form a cycle: {cycle}")
    data = _read_mapping(path)
    merged: dict[str, Any] = {}
    for base in _base_paths(data, path):
        if not base.is_file():
            raise RecipeError(f"{path}: {BASE_KEY} {base} does not exist")
        merged = merge_mappings(merged, load_recipe(base, (*_chain, path)))
    own = {key: value for key, value in data.items() if key != BASE_KEY}
    return merge_mappings(merged, own)
