"""What the commands print: short lines for a person, or with ``--json`` one object for a machine.

Every command ends with ``emit(result, human, as_json)``; progress lines go through ``say`` (stdout
for a person, stderr under ``--json`` so stdout stays one parseable object). The number helpers
round the way a person reads: ``pct(62.41) == "62.4 %"``, ``count(10000) == "10,000"``,
``duration(95) == "1 min 35 s"``, ``num(0.030000001) == "0.03"``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Mapping, Sequence

from ..errors import EXIT_DIVERGED, EXIT_USAGE
from ..formatting import duration, pct

__all__ = ["EXIT_CODES", "add_json_flag", "emit", "say", "clean", "pct", "count", "duration", "num", "params",
           "table"]

EXIT_CODES = f"""exit codes:
  0    done
  1    a missing optional package (matplotlib for plot, tensorboard) or an unexpected error
  {EXIT_USAGE}    bad usage or input: the message says what is wrong and how to fix it
  {EXIT_DIVERGED}    training stopped on a NaN/inf loss (the last checkpoint is intact)
  130  interrupted (Ctrl-C): a training run checkpoints first"""


def add_json_flag(parser: argparse.ArgumentParser, keys: str) -> None:
    """``--json``: one object on stdout instead of the human lines; ``keys`` documents its fields."""
    parser.add_argument("--json", action="store_true",
                        help=f"print one JSON object instead of the human lines; keys: {keys}")


def clean(value: Any, digits: int = 6) -> Any:
    """Floats rounded to ``digits`` significant digits, recursively (float32 noise such as
    12.99999952316 becomes 13.0); NaN/inf become None so the output is strict JSON."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{digits}g}")
    if isinstance(value, Mapping):
        return {str(k): clean(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v, digits) for v in value]
    return value


def emit(result: Mapping[str, Any], human: str, as_json: bool) -> None:
    """Print the command's result: ``human`` text, or ``result`` as one JSON line."""
    print(json.dumps(clean(result)) if as_json else human, flush=True)


def say(text: str, as_json: bool) -> None:
    """A progress line: stdout for a person, stderr under ``--json``."""
    print(text, file=sys.stderr if as_json else sys.stdout, flush=True)


def count(n: int) -> str:
    """An integer with thousands separators: ``10,000``."""
    return f"{n:,}"


def num(value: float, digits: int = 3) -> str:
    """A float to ``digits`` significant digits without float noise: 0.03, 4.12, 1e-06, 30."""
    return f"{value:.{digits}g}"


def params(n: int) -> str:
    """A parameter count: ``23.5 M``, ``940 k``."""
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.3g} k" if n >= 1e3 else str(n)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
