"""Learning-rate schedules of the official code, as a LambdaLR over optimisation steps."""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["lr_factor", "make_scheduler"]


def lr_factor(epoch: float, epochs: int, schedule: str, milestones: Sequence[int] = ()) -> float:
    """Multiplier of the base lr at (fractional) ``epoch``: half-cosine or x0.1 per milestone passed."""
    if schedule == "cos":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return 0.1 ** sum(epoch >= m for m in milestones)
    raise ValueError(f"unknown schedule {schedule!r}; valid: cos, step")


def make_scheduler(optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int, schedule: str,
                   milestones: Sequence[int] = (), per_iteration: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration. By default the lr changes only at epoch starts, as the official
    ``adjust_learning_rate``; ``per_iteration`` makes it a smooth function of the fractional epoch."""
    def factor(step: int) -> float:
        epoch = step / steps_per_epoch if per_iteration else step // steps_per_epoch
        return lr_factor(epoch, epochs, schedule, milestones)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
