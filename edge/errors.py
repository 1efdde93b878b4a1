"""The tool's own error types: each carries a one-line message fit for a user's terminal."""

from __future__ import annotations

import os


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class XrayEdgeError(Exception):
    """Base of every error the tool reports to a user instead of a traceback."""


class ImageError(XrayEdgeError):
    """An input file that cannot become a model input (missing, unreadable, corrupt, ...)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ModelError(XrayEdgeError):
    """A model file or manifest that cannot be used (corrupt, mismatched sha256, ...)."""


class RuntimeMissing(XrayEdgeError):
    """No usable inference runtime for the model; the message names the extra to install."""


class DatasetError(XrayEdgeError):
    """A dataset folder that cannot be trained on (missing train/, one class, empty class)."""
