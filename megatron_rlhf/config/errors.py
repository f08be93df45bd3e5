"""The one exception type for errors a user can cause, and its three specialisations.

The command line (``megatron_rlhf.cli``) prints a :class:`UserError` as ``error: <message>`` and
exits 2; every other exception is a defect of the program and keeps its traceback. Library code
raises a :class:`UserError` (or a subclass) only for something the user controls: a value in a
config file or on the command line, a data file, a checkpoint or model directory they pointed at,
an output path in the way. The message names the value and where it came from (``file: key.path``
for config, ``file:line`` for data).

``UserError`` derives from ``ValueError`` so callers that already catch ``ValueError`` keep
working; :class:`MissingInput` and :class:`OutputInTheWay` also derive from ``FileNotFoundError``
and ``FileExistsError``. This module imports nothing: every layer may import it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave is wrong; the message says what and where."""


class ConfigError(UserError):
    """A config file or mapping holds a value of the wrong type or range (message: ``file: key``)."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (or is not what it should be)."""


class OutputInTheWay(UserError, FileExistsError):
    """An output path would overwrite something the user has (or cannot be created)."""
