"""``argparse`` value types and options shared by the ``megatron-rlhf`` commands (standard library only).

Each raises ``argparse.ArgumentTypeError`` naming the rejected text, which argparse reports with
the option's name.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _checked(convert: Callable[[str], float], accept: Callable[[float], bool], expected: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
positive_float = _checked(float, lambda value: value > 0, "a positive number")
non_negative_float = _checked(float, lambda value: value >= 0, "a number >= 0")


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``, shared by the commands that write a directory ``--out``."""
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists and is not empty"
    )
