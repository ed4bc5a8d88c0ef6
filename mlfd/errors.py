"""The error types every layer raises: the lowest module of the package, importing nothing from it."""

from __future__ import annotations

from typing import Any


class SpecError(ValueError):
    """A spec or input file is invalid. The message is one line naming the field and what is allowed."""

    def __init__(self, *args: Any) -> None:
        # The message is printed as one line (``mlfd: error: ...``): a user-supplied key or path with a newline in it
        # must not break that.
        if args and isinstance(args[0], str):
            args = (" ".join(args[0].splitlines()), *args[1:])
        super().__init__(*args)


class CorruptArtifact(SpecError):
    """A stored file does not match its recorded checksum or cannot be parsed."""


class StorageError(OSError):
    """Writing outputs failed (disk full, permissions). Nothing stored earlier was touched."""


class NodeLost(SpecError):
    """A search stopped because no live node of the Ray cluster can host its waiting trials (a node was lost).

    The experiment state is saved: ``mlfd tune --resume`` on a healthy cluster finishes the search."""
