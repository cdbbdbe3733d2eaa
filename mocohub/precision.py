"""One switch for mixed precision, shared by training and every evaluation loop.

``auto`` (the default everywhere) picks the fastest precision the hardware computes natively:
on CUDA bf16 from compute capability 8.0 (A100, H100), fp16 with loss scaling below it (V100, T4:
fp16 tensor cores only, as the official v3 trains); on a CPU bf16 where oneDNN runs it natively
(AMX tiles, or AVX512-BF16 as on AMD Zen 4) and fp32 elsewhere: where bf16 is emulated (AVX2)
autocast runs ~10x slower than fp32, so the rule must never guess. Each rule is a pure function of
the facts it reads, so a table of faked devices tests it on any machine.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from .errors import MocohubError
from .precision_names import PRECISION_CHOICES, PRECISION_NAMES

__all__ = ["PRECISIONS", "PRECISION_CHOICES", "autocast", "resolve_precision", "resolve_channels_last",
           "auto_precision", "native_bf16", "cuda_auto_precision", "cpu_auto_precision", "cpu_flags"]

PRECISIONS = dict(zip(PRECISION_NAMES, (None, torch.bfloat16, torch.float16)))
NATIVE_BF16_FLAGS = (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16"))  # /proc/cpuinfo flag, name


def cuda_auto_precision(capability: tuple[int, int]) -> tuple[str, str]:
    """bf16 tensor cores exist from compute capability 8.0; below it cuDNN has no bf16 convolutions
    (``torch.cuda.is_bf16_supported()`` still says True there, counting emulation), so fp16."""
    cc = f"compute capability {capability[0]}.{capability[1]}"
    if tuple(capability) >= (8, 0):
        return "bf16", f"native bf16: {cc}"
    return "fp16", f"no bf16 tensor cores below compute capability 8.0 ({cc}): fp16 with loss scaling"


def cpu_auto_precision(capability: str, flags: frozenset[str], onednn_bf16: bool) -> tuple[str, str]:
    """bf16 where oneDNN says it supports bf16 and the CPU computes it in hardware (AMX tiles or
    AVX512-BF16); oneDNN's verdict alone also holds on plain AVX-512, where it emulates bf16."""
    if onednn_bf16:
        for flag, name in NATIVE_BF16_FLAGS:
            if flag in flags:
                return "bf16", f"native bf16: {name}"
    return "fp32", f"bf16 would be emulated on {capability}"


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo, plus what torch detects itself (other systems)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    for flag, probe in (("amx_tile", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            flags.add(flag)
    return frozenset(flags)


def auto_precision(device: torch.device | str) -> tuple[str, str]:
    """What ``auto`` means on ``device``, and a short reason a person can read."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_auto_precision(torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        return cpu_auto_precision(torch.backends.cpu.get_cpu_capability(), cpu_flags(),
                                  bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    return "fp32", f"no mixed-precision rule for {device.type} devices"


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``auto`` picks bf16 on ``device`` (it computes bf16 natively), and why."""
    auto, why = auto_precision(device)
    return auto == "bf16", why


_warned: set[str] = set()


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str]:
    """Turn ``auto`` into fp32, bf16 or fp16 for ``device``; return (precision, why).

    An explicit bf16 where auto would not pick it (emulated on this CPU, or a GPU below compute
    capability 8.0) is honoured but warned about once.
    """
    if precision not in PRECISION_CHOICES:
        raise MocohubError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    auto, why = auto_precision(device)
    if precision == "auto":
        return auto, why
    if precision == "bf16" and auto != "bf16" and why not in _warned:
        _warned.add(why)
        warnings.warn(f"--precision bf16: {why}; --precision auto ({auto} here) is faster", stacklevel=2)
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
