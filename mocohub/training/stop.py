"""When a run stops: Ctrl-C/SIGTERM, a diverged loss, both agreed by every process.

A signal may reach one rank only, and a loss may diverge on one rank only. The processes agree at
each metric flush (every ``--log-every`` steps and at an epoch's end, where the losses reach the
host anyway) with one all-reduce of (signalled, diverged), so every rank stops, or fails, after
the same step instead of hanging in different collectives, and no step waits on the host for it.
A single process stops after the step a signal arrives in.
"""
from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from types import FrameType

from ..errors import EXIT_DIVERGED, MocohubError
from .runtime import Runtime

__all__ = ["StopGuard", "divergence_error"]


def divergence_error(what: str, step: int, epoch: int, checkpoint: Path, precision: str) -> MocohubError:
    """The message of a non-finite loss: what is kept (a checkpoint only if there is one) and what to
    try (``--precision fp32`` only for a run not already in fp32). Exit code ``EXIT_DIVERGED``."""
    kept = (f"the run stopped without saving, so {checkpoint} still holds the last good state"
            if checkpoint.exists() else "the run stopped before its first checkpoint, so nothing was saved")
    fix = "Lower --lr" + (" or train with --precision fp32" if precision != "fp32" else "")
    return MocohubError(f"the loss became {what} at step {step} (epoch {epoch}); {kept}. {fix}", exit_code=EXIT_DIVERGED)


class StopGuard:
    """Holds the run's stop decision. Use as a context manager around the loop: it installs the
    SIGINT/SIGTERM handlers (in the main thread) and puts the previous ones back."""

    def __init__(self, rt: Runtime, checkpoint: Path, precision: str):
        self.rt, self.checkpoint, self.precision = rt, checkpoint, precision
        self.signal: int | None = None
        self.interrupted = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Finish the current step (or interval), checkpoint, then stop (a second signal stops at once)."""
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    @property
    def flush_now(self) -> bool:
        """A single process flushes (and stops) right after a signal; several wait for the next agreed flush."""
        return self.rt.world == 1 and self.signal is not None

    def agree(self, losses: list[tuple[int, float]], epoch: int) -> bool:
        """After a flush of ``(step, loss)`` pairs: whether every process stops now. Raises the
        divergence error on every process when a loss is non-finite on any of them."""
        bad = next(((step, loss) for step, loss in losses if not math.isfinite(loss)), None)
        signalled = self.signal is not None
        if self.rt.world > 1:  # one all-reduce per flush: the flush synced the host already
            signalled, diverged = self.rt.any(signalled, bad is not None)
            if diverged:
                step = losses[-1][0] if losses else -1
                raise divergence_error("non-finite on at least one process", step, epoch, self.checkpoint,
                                       self.precision)
        elif bad is not None:
            raise divergence_error(str(bad[1]), bad[0], epoch, self.checkpoint, self.precision)
        self.interrupted = self.interrupted or signalled
        return self.interrupted
