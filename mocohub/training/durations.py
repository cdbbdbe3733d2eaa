"""``--time-budget``'s text to seconds: pure parsing, apart from the budget's probe (budget.py, torch),
so the command's parser needs no torch."""
from __future__ import annotations

import re

from ..errors import MocohubError

__all__ = ["parse_duration"]

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """Seconds of ``90s``, ``30m``, ``6h`` or ``1h30m`` (hours, minutes, seconds, each optional, in order)."""
    found = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or found is None or not any(found.groups()):
        raise MocohubError(f"--time-budget {text!r}: write a duration such as 90s, 30m, 6h or 1h30m")
    hours, minutes, seconds = (float(g or 0) for g in found.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise MocohubError(f"--time-budget {text!r}: must be more than 0 seconds")
    return total
