"""Errors raised while building models and tasks."""
from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model could not be built or its weights could not be loaded.

    `path` is the weights file involved, when there is one.
    """

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(message)


class UnknownModelError(ModelLoadError):
    """A model name that is not in the zoo."""


class TaskError(ValueError):
    """A task config that does not fit its model (unknown class, wrong model kind)."""
