"""One exception type for every user error, so the CLI prints one line instead of a traceback."""
from __future__ import annotations

__all__ = ["EXIT_DIVERGED", "EXIT_USAGE", "MocohubError"]

EXIT_USAGE = 2  # bad usage or input: the message says what is wrong and how to fix it
EXIT_DIVERGED = 3  # training stopped on a NaN/inf loss (the last checkpoint is intact)


class MocohubError(Exception):
    """Bad input (a path, a name, a flag, a file): the message names the problem and the fix."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code
