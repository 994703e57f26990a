"""User-facing errors.

Every error a user can cause (a bad config key, a missing file, a mask value out of range)
is raised as a subclass of :class:`TfsegError` with a one-line message that names the file,
key or value and what was expected. The CLI prints that line to stderr and exits 2, with no
traceback. Programming errors stay ordinary exceptions and keep their traceback.
"""

from __future__ import annotations

import sys


class TfsegError(Exception):
    """Base class of the errors a user can cause and fix."""


class ConfigError(TfsegError, ValueError):
    """A config file or ``--set`` override is wrong (unknown key, wrong type, out of range)."""


class DataError(TfsegError, ValueError):
    """Input data is missing, unreadable or inconsistent (names the file and the problem)."""


class ModelError(TfsegError, ValueError):
    """A model cannot be built as asked (unknown architecture, impossible input size...)."""


class RunError(TfsegError, ValueError):
    """A training or inference run directory is missing something it needs."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (TensorFlow's ``err.message`` when it has one), or its
    class name when the message is empty: what a one-line error quotes of the cause."""
    text = getattr(err, "message", None) or str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


_SAID: set[str] = set()


def warn_once(line: str) -> str:
    """Print the warning ``line`` on stderr unless this process printed it already (a check that runs
    before every fold of ``--fold all``, or for every Predictor); returns it."""
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr, flush=True)
    return line
