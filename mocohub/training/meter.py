"""What a run measures and reports as it goes: the step metrics (buffered on the device, moved to the
host once per ``--log-every`` steps), the epoch's running sums, throughput, the progress bar and
the epoch line.

The epoch's sums travel in a mid-epoch checkpoint (``EpochSums``), so the epoch row of a run
resumed mid-epoch averages the whole epoch, as the uninterrupted run's does.
"""
from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..formatting import duration, pct
from .runlog import RunLog
from .runtime import Runtime

__all__ = ["EpochSums", "StepMeter", "epoch_line"]


@dataclass
class EpochSums:
    """Running sums of one epoch so far: what its metrics.jsonl row averages."""

    loss: float = 0.0
    acc: float = 0.0
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    lr: float | None = None                          # at the epoch's first step
    failed: list[str] = field(default_factory=list)  # files that could not be decoded (each once)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any] | None) -> "EpochSums":
        return cls(**saved) if saved else cls()


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The human line of a metrics.jsonl row."""
    knn = f", kNN top-1 {pct(row['knn_top1'])} (query encoder output)" if "knn_top1" in row else ""
    skipped = f", {row['skipped']} file(s) skipped" if row["skipped"] else ""
    return (f"epoch {row['epoch'] + 1}/{epochs}: loss {row['loss']:.3f}, instance accuracy "
            f"{pct(row['acc1'])}{knn}, {row['images_per_s']:.0f} img/s, {duration(row['seconds'])}{skipped}")


class StepMeter:
    """One per process; only the main one writes logs and shows the bar."""

    def __init__(self, rt: Runtime, log: RunLog | None, *, log_every: int, steps_per_epoch: int,
                 images_per_step: int, listed_non_images: int, progress: bool):
        self.rt, self.log, self.log_every = rt, log, log_every
        self.steps_per_epoch, self.images_per_step = steps_per_epoch, images_per_step
        self.listed_non_images, self.progress = listed_non_images, progress
        self.pending: list[tuple[int, dict[str, float], torch.Tensor, torch.Tensor]] = []
        self.sums, self.warned, self.bar = EpochSums(), set(), None
        self.t0 = self.session_images = 0

    def start_epoch(self, epoch: int, step_in_epoch: int, sums: EpochSums | None = None) -> None:
        """Begin (or, with the checkpoint's ``sums``, continue) an epoch."""
        self.epoch, self.sums, self.pending = epoch, sums or EpochSums(), []
        self.t0, self.session_images = time.perf_counter(), 0
        self.bar = tqdm(total=self.steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch}",
                        disable=not (self.rt.main and self.progress), dynamic_ncols=True, unit="step")

    def add(self, step: int, schedule: dict[str, float], loss: torch.Tensor, acc: torch.Tensor,
            failed: list[str]) -> None:
        """Buffer a step's metrics (no host sync) and note the files its batch could not decode."""
        self.pending.append((step, schedule, loss, acc))
        if self.sums.lr is None:
            self.sums.lr = schedule["lr"]
        for path in failed:
            if path not in self.sums.failed:
                self.sums.failed.append(path)
            if path not in self.warned:
                self.warned.add(path)
                warnings.warn(f"skipped an image that could not be decoded: {path}", stacklevel=3)
        self.sums.images += self.images_per_step
        self.session_images += self.images_per_step
        self.bar.update(1)

    def due(self, end_of_epoch: bool) -> bool:
        """Every process flushes at the same steps (the stop agreement rides on the flush)."""
        return len(self.pending) >= self.log_every or (end_of_epoch and bool(self.pending))

    def flush(self) -> list[tuple[int, float]]:
        """Move the buffered [loss, accuracy] pairs to the host (the loop's one sync), log one
        steps.jsonl row for them, add them to the epoch's sums; return the (step, loss) pairs."""
        if not self.pending:
            return []
        values = torch.stack([torch.stack([loss, acc]) for _, _, loss, acc in self.pending]).cpu().tolist()
        losses, accs = zip(*values)
        last_step, schedule = self.pending[-1][0], self.pending[-1][1]
        if self.rt.main:  # one line per interval: its last step, mean loss and accuracy, lr (and m)
            self.log.log_steps({"step": last_step, "epoch": self.epoch, "steps": len(values),
                                "loss": statistics.fmean(losses), "acc1": 100 * statistics.fmean(accs),
                                **schedule})
        self.sums.loss += sum(losses)
        self.sums.acc += sum(accs)
        self.sums.steps += len(values)
        elapsed = time.perf_counter() - self.t0
        self.bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{schedule['lr']:.4g}",
                             img_s=f"{self.session_images / max(elapsed, 1e-9):.0f}")
        steps = [step for step, _, _, _ in self.pending]
        self.pending = []
        return list(zip(steps, losses))

    def _shared_failures(self) -> list[str]:
        """Every process's undecodable files of the epoch, each once (a collective under DDP)."""
        if self.rt.world == 1:
            return list(self.sums.failed)
        every: list[list[str]] = [[] for _ in range(self.rt.world)]
        dist.all_gather_object(every, self.sums.failed)
        return sorted({path for part in every for path in part})

    def capture(self) -> EpochSums:
        """The epoch's sums so far, for a mid-epoch checkpoint (all processes call it together)."""
        seconds = self.sums.seconds + time.perf_counter() - self.t0
        return EpochSums(**{**self.sums.as_dict(), "seconds": seconds, "failed": self._shared_failures()})

    def end_epoch(self) -> dict[str, Any]:
        """The epoch's metrics.jsonl row (all processes call it together)."""
        sums = self.capture()
        self.bar.close()
        n = max(1, sums.steps)
        return {"epoch": self.epoch, "loss": sums.loss / n, "acc1": 100 * sums.acc / n, "lr": sums.lr,
                "images_per_s": sums.images / max(sums.seconds, 1e-9), "seconds": sums.seconds,
                "skipped": self.listed_non_images + len(sums.failed)}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
