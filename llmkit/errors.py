"""Errors a user can act on. The CLI prints them as one `Error:` line plus a hint; no traceback."""

from __future__ import annotations


class LlmkitError(Exception):
    """A user mistake or an environment problem, with a hint on what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(LlmkitError):
    """Invalid options or arguments: exit status 2, like any command-line usage error."""

    exit_code = 2


class ModelError(LlmkitError):
    """A model that cannot be found, loaded or used."""


class InputError(LlmkitError):
    """Input text or data that cannot be read or used."""


class OutputError(LlmkitError):
    """An output location that cannot be written."""
