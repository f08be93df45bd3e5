"""Wire format for plain Python values crossing from the untrusted process to the test process.

Only exact built-in types are encoded: None, bool, int, float, str, bytes, complex, list, tuple,
dict, set, frozenset. Anything else (a subclass of list, an object with a custom ``__eq__``, a
generator, ...) is encoded as ``{"opaque": <type name>}`` and decoded into :class:`Opaque`, which
is equal to nothing. Decoding builds fresh objects of exact built-in types only, so a value that
reaches the tests can never run code the candidate wrote: comparisons are the built-ins' own.

JSON layout: None/bool/str/small int as themselves; a list as a JSON array; every other value as a
one-key object whose key names its type. Floats travel as ``float.hex`` (exact, NaN and infinities
included); ints beyond 2**53 as hex. Nesting is limited to :data:`MAX_DEPTH`.

Standard library only: this file runs inside the sandbox.
"""

from __future__ import annotations

import json

MAX_DEPTH = 64
SAFE_INT = 2**53


class CodecError(ValueError):
    """A value that cannot be encoded, or a message that is not a valid encoding."""


class Opaque:
    """A value of a type the codec does not carry: equal to nothing but itself."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name[:100]

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<opaque {self.type_name}>"


def encode(value: object, depth: int = 0) -> object:
    """A JSON-ready tree for ``value`` (see the module docstring)."""
    if depth > MAX_DEPTH:
        raise CodecError(f"value nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value if -SAFE_INT < value < SAFE_INT else {"int": hex(value)}
    if kind is float:
        return {"float": value.hex()}
    if kind is list:
        return [encode(item, depth + 1) for item in value]
    if kind is tuple:
        return {"tuple": [encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {kind.__name__: [encode(item, depth + 1) for item in value]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real.hex(), value.imag.hex()]}
    if isinstance(value, Opaque):
        return {"opaque": value.type_name}
    return {"opaque": kind.__name__ if isinstance(kind.__name__, str) else "object"}


def decode(tree: object, depth: int = 0) -> object:
    """Fresh built-in values from an :func:`encode` tree; raises :class:`CodecError` on anything else."""
    if depth > MAX_DEPTH:
        raise CodecError(f"value nested deeper than {MAX_DEPTH}")
    kind = type(tree)
    if tree is None or kind is bool or kind is str:
        return tree
    if kind is int:
        if not -SAFE_INT < tree < SAFE_INT:
            raise CodecError("plain integer out of range")
        return tree
    if kind is list:
        return [decode(item, depth + 1) for item in tree]
    if kind is not dict or len(tree) != 1:
        raise CodecError(f"not a value encoding: {type(tree).__name__}")
    ((tag, body),) = tree.items()
    try:
        if tag == "int":
            return int(body, 16)
        if tag == "float":
            return float.fromhex(body)
        if tag == "tuple":
            return tuple(decode(item, depth + 1) for item in _list(body))
        if tag == "dict":
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in _pairs(body)}
        if tag == "set":
            return {decode(item, depth + 1) for item in _list(body)}
        if tag == "frozenset":
            return frozenset(decode(item, depth + 1) for item in _list(body))
        if tag == "bytes":
            return bytes.fromhex(body)
        if tag == "complex":
            real, imag = _list(body)
            return complex(float.fromhex(real), float.fromhex(imag))
        if tag == "opaque":
            return Opaque(str(body))
    except (TypeError, ValueError, OverflowError) as error:
        raise CodecError(f"bad {tag!r} encoding: {error}") from None
    raise CodecError(f"unknown value tag {tag!r}")


def _list(body: object) -> list:
    if type(body) is not list:
        raise CodecError("expected a list")
    return body


def _pairs(body: object) -> list:
    pairs = _list(body)
    if any(type(pair) is not list or len(pair) != 2 for pair in pairs):
        raise CodecError("expected [key, value] pairs")
    return pairs


def dumps_message(message: dict) -> bytes:
    """One protocol message: a JSON object on one line."""
    return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def loads_message(line: bytes) -> dict:
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise CodecError(f"unreadable message: {str(error)[:200]}") from None
    if type(message) is not dict:
        raise CodecError("message is not a JSON object")
    return message
