"""Numbers rounded the way a person reads them, for every layer's human lines (the CLI and the trainer).

``pct(62.41) == "62.4 %"``, ``duration(95) == "1 min 35 s"``.
"""
from __future__ import annotations

__all__ = ["pct", "duration"]


def pct(value: float | None, digits: int = 1) -> str:
    """A percentage as people write it: ``62.4 %``."""
    return "n/a" if value is None else f"{value:.{digits}f} %"


def duration(seconds: float) -> str:
    """``0.4 s``, ``38 s``, ``1 min 35 s``, ``2 h 05 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
