"""Collectives the trainer needs beyond the step's own (DDP syncs gradients and, at each forward,
buffers): rank 0's BN statistics on every rank before the kNN monitor embeds."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .runtime import Runtime

__all__ = ["broadcast_buffers"]


@torch.no_grad()
def broadcast_buffers(rt: Runtime, module: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) into every rank's ``module``: each rank's last
    training step updated them from its own batch, and DDP would broadcast them only at the next
    forward, so the monitor's ranks would embed with different statistics. One broadcast per dtype."""
    if rt.world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(value.view_as(buffer))
