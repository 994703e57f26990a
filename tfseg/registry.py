"""Name -> builder tables whose errors list what exists.

Example:
    >>> ARCHS = Registry("arch")
    >>> @ARCHS.register("unet")
    ... def build_unet(**kw): ...
    >>> ARCHS.get("unte")
    Traceback (most recent call last):
    ...
    tfseg.errors.ModelError: Received: arch='unte' (did you mean 'unet'?). Expected one of ['unet'].
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from tfseg.errors import TfsegError

T = TypeVar("T")


def nearest(name: str, candidates) -> str | None:
    """Return the candidate closest to ``name``, or None: the one that differs only in case (``sm.unet`` ->
    ``sm.Unet``), else the closest by difflib's ratio (at least 0.5)."""
    candidates = [str(c) for c in candidates]
    same = [c for c in candidates if c.lower() == str(name).lower()]
    if same:
        return same[0]
    matches = difflib.get_close_matches(str(name), candidates, n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name_message(kind: str, name, valid) -> str:
    """One-line message for an unknown name: what was received, the nearest, and the valid ones."""
    valid = sorted(str(v) for v in valid)
    hint = nearest(name, valid)
    did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
    return f"Received: {kind}={name!r}{did_you_mean}. Expected one of {valid}."


def plural(n: int, word: str, words: str | None = None) -> str:
    """``n`` and the noun it counts, for messages: ``plural(1, "group")`` -> ``"1 group"``, else ``"2 groups"``.

    ``words`` is the plural when it is not ``word + "s"`` (``plural(3, "entry", "entries")``).
    """
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


class Registry(Generic[T]):
    """A table of named entries (builders, encoders, augmentations...).

    Args:
        kind: what the names are, used in error messages ("arch", "backbone", "loss").
        error: the TfsegError subclass raised for an unknown name.
    """

    def __init__(self, kind: str, error: type[TfsegError] | None = None):
        from tfseg.errors import ModelError

        self.kind = kind
        self.error = error or ModelError
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """Register ``entry`` under ``name``; without ``entry``, return a decorator."""
        if entry is not None:
            self._add(name, entry)
            return entry

        def decorator(obj: T) -> T:
            self._add(name, obj)
            return obj

        return decorator

    def _add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        """Return the entry for ``name`` or raise a one-line error listing the valid names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.error(unknown_name_message(self.kind, name, self._entries)) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

