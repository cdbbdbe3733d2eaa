"""Learning-rate schedules of the official code, as factors of the peak lr over optimisation steps."""
from __future__ import annotations

import math
from typing import Callable, Sequence

__all__ = ["lr_factor", "lr_schedule"]


def lr_factor(epoch: float, epochs: int, schedule: str, milestones: Sequence[int] = ()) -> float:
    """Multiplier of the base lr at (fractional) ``epoch``: half-cosine or x0.1 per milestone passed."""
    if schedule == "cos":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return 0.1 ** sum(epoch >= m for m in milestones)
    raise ValueError(f"unknown schedule {schedule!r}; valid: cos, step")


def lr_schedule(*, epochs: int, steps_per_epoch: int, schedule: str, milestones: Sequence[int] = (),
                per_iteration: bool = False) -> Callable[[int], float]:
    """The lr factor of each step. By default it changes only at epoch starts, as the official
    ``adjust_learning_rate``; ``per_iteration`` makes it a smooth function of the fractional epoch."""
    def factor(step: int) -> float:
        epoch = step / steps_per_epoch if per_iteration else step // steps_per_epoch
        return lr_factor(epoch, epochs, schedule, milestones)
    return factor
