"""One switch for mixed precision, shared by training and every evaluation loop."""
from __future__ import annotations

import contextlib

import torch

from .errors import MocohubError

__all__ = ["PRECISIONS", "autocast"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16, nothing for fp32."""
    if precision not in PRECISIONS:
        raise MocohubError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
