"""One exception type for every user error, so the CLI prints one line instead of a traceback."""
from __future__ import annotations

__all__ = ["MocohubError"]


class MocohubError(Exception):
    """Bad input (a path, a name, a flag, a file): the message names the problem and the fix."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
