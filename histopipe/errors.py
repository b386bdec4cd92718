"""Errors that reach the user as one clear line (file + problem), never a traceback."""

from __future__ import annotations


class HistopipeError(Exception):
    """Base class: the CLI prints ``str(err)`` and exits non-zero."""


class ConfigError(HistopipeError):
    """A config value or cohort-sheet entry is invalid."""


class SlideError(HistopipeError):
    """A slide cannot be used (missing, unsupported, corrupt, no µm/px...).

    The message always starts with the slide path so that logs name the file.
    """

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WeightsError(HistopipeError):
    """Model weights are missing or do not match the architecture."""
