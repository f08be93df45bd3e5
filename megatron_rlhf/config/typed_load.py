"""Strict typing of config mappings (parsed YAML/JSON) into config dataclasses.

Every config file of the project is read the same way: the entry point parses the file (and,
for recipes, merges its ``base:`` files into one mapping), then calls
:func:`dataclass_from_mapping` once with the top-level dataclass. The field annotations are the
schema::

    from megatron_rlhf.config.typed_load import dataclass_from_mapping
    config = dataclass_from_mapping(RLConfig, yaml.safe_load(text), "run.yaml")
    # run.yaml: n: expected an integer, got 2.5 (float)  -> ConfigError

Guarantees:

- ``int`` takes integers only (not ``true``, not ``2.5``, not ``"4"``); ``bool`` takes ``true`` /
  ``false`` only (not ``"no"``); ``str`` takes strings only; ``float`` takes numbers, and also
  strings YAML 1.1 leaves unparsed such as ``1e-5`` (no dot), but not ``"fast"``.
- ``tuple[X, ...]`` and ``list[X]`` take a YAML list (a single string is refused, never read
  character by character); ``tuple[X, Y]`` takes a list of exactly that length; ``dict[K, V]`` and
  ``Mapping[K, V]`` take a mapping; items are typed recursively. ``Literal[...]`` takes one of its
  values. ``X | None`` takes ``null`` or an ``X``; other unions try each member in order.
- Nested dataclass fields take a mapping (typed recursively) or an instance of the class.
- Unknown keys and missing required keys are errors; the dataclass's own validation
  (``__post_init__``) runs last, and its ``ValueError``/``TypeError`` is re-raised naming ``where``.
- Every error is a :class:`~megatron_rlhf.config.errors.ConfigError` whose message starts with
  ``where`` and the key path: ``file.yaml: actor.parallel.tensor_parallel: expected ...``.

Not done here: YAML parsing and ``base:`` inheritance (``config/recipe.py``), and relative-path
resolution (the entry point knows what paths are relative to). ``Any`` fields are passed as given.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping as AbcMapping
from typing import Any

from megatron_rlhf.config.errors import ConfigError

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def at(where: str, key: Any) -> str:
    """The location of ``key`` inside ``where`` (``file: a.b`` then ``file: a.b.key``)."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if ": " in where else f"{where}: {key}"


def dataclass_from_mapping(cls: type, mapping: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``mapping`` (or return ``mapping`` if it already is a ``cls``).

    ``where`` names the place of ``mapping``: a file (``run.yaml``) or a file and key path
    (``run.yaml: actor``). Raises :class:`ConfigError` naming ``where`` and the key path.
    """
    if isinstance(mapping, cls):
        return mapping
    if not isinstance(mapping, AbcMapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {_shown(mapping)}")
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # an annotation names a type only imported for type checkers
        hints = {}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(key) for key in mapping if key not in fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in mapping]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    values = {name: convert(hints.get(name, Any), value, at(where, name)) for name, value in mapping.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def convert(hint: Any, value: Any, where: str) -> Any:
    """``value`` typed as ``hint`` (see the module docstring); ConfigError naming ``where``."""
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return _convert_union(typing.get_args(hint), value, where)
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {_shown(value)}")
    if origin is typing.Literal:
        if any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint)):
            return value
        raise ConfigError(f"{where}: expected one of {list(typing.get_args(hint))}, got {_shown(value)}")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return dataclass_from_mapping(hint, value, where)
    if origin in (tuple, list) or hint in (tuple, list):
        return _convert_sequence(hint, value, where)
    if origin in (dict, AbcMapping, typing.Mapping) or hint in (dict, typing.Mapping, AbcMapping):
        return _convert_mapping(hint, value, where)
    return _convert_scalar(hint, value, where)


def describe(hint: Any) -> str:
    """What a user must write for ``hint``, in words."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        return " or ".join(describe(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    if origin in (tuple, list) or hint in (tuple, list):
        return "a list"
    if origin in (dict, AbcMapping, typing.Mapping) or hint in (dict, typing.Mapping, AbcMapping):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _convert_union(options: tuple, value: Any, where: str) -> Any:
    if value is None and type(None) in options:
        return None
    candidates = [option for option in options if option is not type(None)]
    if len(candidates) == 1 and not _is_scalar(candidates[0]):
        return convert(candidates[0], value, where)  # its own error names the nested key
    for option in candidates:
        try:
            return convert(option, value, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: expected {' or '.join(describe(option) for option in options)}, got {_shown(value)}")


def _is_scalar(hint: Any) -> bool:
    return hint in (bool, int, float, str) or typing.get_origin(hint) is typing.Literal


def _convert_sequence(hint: Any, value: Any, where: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {_shown(value)}")
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}: {list(value)!r}")
        return tuple(convert(item_hint, item, at(where, i)) for i, (item_hint, item) in enumerate(zip(args, value)))
    item_hint = args[0] if args else Any
    items = [convert(item_hint, item, at(where, i)) for i, item in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_mapping(hint: Any, value: Any, where: str) -> Any:
    if not isinstance(value, AbcMapping):
        raise ConfigError(f"{where}: expected a mapping, got {_shown(value)}")
    key_hint, value_hint = typing.get_args(hint) or (Any, Any)
    return {convert(key_hint, key, where): convert(value_hint, item, at(where, key)) for key, item in value.items()}


def _convert_scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        return value  # a typing construct this loader does not know: passed as given
    raise ConfigError(f"{where}: expected {describe(hint)}, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"
