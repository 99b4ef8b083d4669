"""The one exception family the CLI turns into a single line and an exit code, and its warning."""

from __future__ import annotations

# Exit codes are part of the CLI contract (README documents them).
EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2
EXIT_UNSUPPORTED = 3

# What json.loads raises on bad input: ValueError (JSONDecodeError, UnicodeDecodeError, an integer past
# Python's digit limit) and RecursionError (nesting deeper than the stack).
BAD_JSON = (ValueError, RecursionError)


class EditguardError(Exception):
    """An expected failure with a message meant for the user (bad input, missing file, ...)."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of a library's error message for a one-line error (its type where it has none)."""
    lines = str(exc).splitlines()
    return (lines[0] if lines and lines[0].strip() else type(exc).__name__)[:limit]


class EditguardWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""


class NothingExamined(EditguardError):
    """A scan in which no test could run: an error for a gate, "nothing flagged" for a caller that only
    looks for facts to show."""


class UnsupportedError(EditguardError):
    """Valid input that editguard cannot handle (unknown architecture, ...)."""

    exit_code = EXIT_UNSUPPORTED


def malformed(exc: Exception) -> str:
    """What a KeyError/TypeError/ValueError met while reading a file's fields says about the file."""
    return f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
