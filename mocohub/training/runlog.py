"""A run's logs in one owner: steps.jsonl and metrics.jsonl, curves.png and, optionally, TensorBoard.

The trainer's main process makes one ``RunLog``; ``trim`` first when resuming, then ``log_steps``
per interval and ``log_epoch`` per epoch, ``close`` at the end. TensorBoard gets the same scalars
against the global step (``steps/loss``, ``epoch/knn_top1``, ...), so its curves match the files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import MocohubError
from ..jsonlog import append_jsonl, trim_jsonl
from ..plotting import write_curves
from ..run_folder import TENSORBOARD, RunFolder

__all__ = ["RunLog", "TENSORBOARD_DIR", "TENSORBOARD_INSTALL"]

TENSORBOARD_DIR = TENSORBOARD
TENSORBOARD_INSTALL = "pip install 'mocohub[tensorboard]' (or pip install tensorboard)"
_NOT_SCALARS = {"step", "epoch", "steps"}  # the row's position, not a curve


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunLog:
    """Append-only logs of one run folder (main process only).

    ``tensorboard=True`` also writes ``RUN_DIR/tensorboard/`` (needs the tensorboard package);
    ``curves=True`` redraws ``RUN_DIR/curves.png`` after each epoch when matplotlib is installed.
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False, curves: bool = True):
        self.run_dir, self.folder = Path(run_dir), RunFolder(run_dir)
        self.curves = curves
        self._writer = self._summary_writer = None
        self._purge_step: int | None = None
        self._steps_done = 0  # the global step at which the next epoch row is shown in TensorBoard
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MocohubError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_INSTALL}",
                                   exit_code=1) from None
            self._summary_writer = SummaryWriter

    @property
    def steps_path(self) -> Path:
        return self.folder.steps

    @property
    def metrics_path(self) -> Path:
        return self.folder.metrics

    def trim(self, step: int, epoch: int) -> None:
        """Forget what a run resumed at global ``step`` and ``epoch`` will log again: step rows
        with step >= ``step``, epoch rows with epoch >= ``epoch`` (and their TensorBoard events)."""
        trim_jsonl(self.steps_path, lambda r: r.get("step", step) < step)
        trim_jsonl(self.metrics_path, lambda r: r.get("epoch", epoch) < epoch)
        self._purge_step = self._steps_done = step

    def _tensorboard(self):
        """The SummaryWriter, opened at the first row so that a ``trim`` before it can purge."""
        if self._writer is None and self._summary_writer is not None:
            self._writer = self._summary_writer(str(self.folder.tensorboard), purge_step=self._purge_step)
        return self._writer

    def log_steps(self, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Append one ``steps.jsonl`` row per logging interval (keys step, epoch, steps, loss, acc1, lr)."""
        rows = [rows] if isinstance(rows, Mapping) else list(rows)
        append_jsonl(self.steps_path, rows)
        writer = self._tensorboard()
        for row in rows:
            self._steps_done = int(row["step"]) + 1
            if writer is not None:
                for key, value in _scalars(row).items():
                    writer.add_scalar(f"steps/{key}", value, int(row["step"]))

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Append one ``metrics.jsonl`` row (epoch, loss, acc1, lr, ..., knn_top1) and redraw the curves."""
        append_jsonl(self.metrics_path, [row])
        writer = self._tensorboard()
        if writer is not None:
            for key, value in _scalars(row).items():
                writer.add_scalar(f"epoch/{key}", value, self._steps_done)
            writer.flush()
        if self.curves:
            write_curves(self.run_dir)

    def close(self) -> None:
        """Flush and close TensorBoard's event file (the JSON files need nothing)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
