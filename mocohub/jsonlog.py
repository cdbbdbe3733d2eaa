"""A training run's two JSON-lines logs, read and written so that a kill mid-write never breaks them.

``steps.jsonl``: one line per ``--log-every`` interval (step, epoch, steps, loss, acc1, lr);
``metrics.jsonl``: one line per epoch (epoch, loss, acc1, lr, images_per_s, seconds, skipped and,
with a kNN monitor, knn_top1 and knn_top5). ``step`` and ``epoch`` count from 0.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .fileio import atomic_write, disk_full, disk_full_error
from .run_folder import METRICS, STEPS

__all__ = ["STEPS_NAME", "METRICS_NAME", "read_jsonl", "append_jsonl", "trim_jsonl"]

STEPS_NAME, METRICS_NAME = STEPS, METRICS  # the names other modules import


def _parse(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:  # a line torn by a kill mid-write
        return None
    return row if isinstance(row, dict) else None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every whole row of ``path`` ([] when it does not exist); torn lines are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = (_parse(line) for line in path.read_text().splitlines() if line.strip())
    return [row for row in rows if row is not None]


def append_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append one line per row. A torn last line (no newline) is closed first, so the new rows
    never merge into it. On a full disk the file is cut back to its old end (no torn row is left)
    and ``disk_full_error`` is raised."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    torn = False
    if size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    try:
        with open(path, "a") as f:
            f.write("\n" * torn + "".join(json.dumps(dict(r)) + "\n" for r in rows))
    except OSError as e:
        if not disk_full(e, path.parent):
            raise
        os.truncate(path, size)
        raise disk_full_error(path, f"{path} keeps its earlier rows, none half-written") from e


def trim_jsonl(path: str | os.PathLike, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Keep the rows for which ``keep(row)`` is true (e.g. those before a resumed run's checkpoint)
    and drop torn lines; the file is replaced atomically."""
    path = Path(path)
    if path.exists():
        text = "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r))
        atomic_write(path, lambda p: Path(p).write_text(text))
