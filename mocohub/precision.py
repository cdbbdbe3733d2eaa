"""One switch for mixed precision, shared by training and every evaluation loop.

``auto`` (the default everywhere) picks bf16 only where the hardware computes it natively and fp32
elsewhere: on a CPU without native bf16 (AVX2 only) autocast emulates it and runs ~10x slower than
fp32, so the rule must never guess.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from .errors import MocohubError

__all__ = ["PRECISIONS", "PRECISION_CHOICES", "autocast", "resolve_precision", "resolve_channels_last",
           "native_bf16"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", *PRECISIONS)


@functools.lru_cache(maxsize=None)
def _cpu_native_bf16() -> tuple[bool, str]:
    """oneDNN's own verdict plus AMX tiles: AVX512-BF16 alone is not measured to beat fp32 here."""
    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    if onednn and amx:
        return True, "this CPU has AMX (native bf16)"
    cap = torch.backends.cpu.get_cpu_capability()
    return False, f"this CPU ({cap}) has no native bf16, where bf16 is emulated and slower than fp32"


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and a short reason a person can read."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, ("this GPU supports bf16" if ok else "this GPU has no bf16")
    if device.type == "cpu":
        return _cpu_native_bf16()
    return False, f"no bf16 rule for {device.type} devices"


_warned: set[str] = set()


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str]:
    """Turn ``auto`` into fp32 or bf16 for ``device``; return (precision, why).

    An explicit bf16 on a CPU without native bf16 is honoured but warned about once.
    """
    if precision not in PRECISION_CHOICES:
        raise MocohubError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    ok, why = native_bf16(device)
    if precision == "auto":
        return ("bf16", why) if ok else ("fp32", why)
    if precision == "bf16" and not ok and torch.device(device).type == "cpu" and why not in _warned:
        _warned.add(why)
        warnings.warn(f"--precision bf16: {why}; --precision auto (fp32 here) is faster", stacklevel=2)
    return precision, "as asked"


def resolve_channels_last(channels_last: bool | str | None, precision: str) -> bool:
    """``auto``/None: NHWC with bf16/fp16, where oneDNN and cuDNN have their fast kernels; NCHW in fp32,
    where it is measured to make no difference on AVX2 CPUs."""
    if channels_last in (None, "auto"):
        return precision in ("bf16", "fp16")
    if isinstance(channels_last, str):
        return channels_last.lower() in ("1", "true", "yes", "on")
    return bool(channels_last)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16, nothing for fp32 (``auto`` is resolved for ``device`` first)."""
    if precision == "auto":
        precision = resolve_precision(precision, device)[0]
    if precision not in PRECISIONS:
        raise MocohubError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
