"""The error every curation step raises for bad input, and the helpers that name the place."""
from __future__ import annotations

import os


class CurateError(ValueError):
    """A curation input is missing, malformed or empty; the message names the file and line."""


def where(path: str, line: int | None = None) -> str:
    """``path:line`` (or just ``path``), the prefix of every input error."""
    return f"{path}:{line}" if line is not None else str(path)


def require_file(path: str, what: str) -> None:
    """Raise a CurateError naming ``what`` (e.g. 'corpus') when ``path`` is not a readable file."""
    if not os.path.exists(path):
        raise CurateError(f"{path}: {what} file does not exist")
    if not os.path.isfile(path):
        raise CurateError(f"{path}: {what} path is not a regular file")
