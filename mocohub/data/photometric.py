"""Photometric augmentations on a whole batch at once, each sample with its own parameters.

Every function takes float images ``x`` of shape (N, 3, H, W) with values in [0, ``bound``]
(1 for torchvision's float images; the batched pipeline works in [0, 255], straight from the uint8
crops) and per-sample parameter tensors of shape (N,), and computes what
``torchvision.transforms.v2.functional`` computes on each image alone (same formulas, same
clamping), so one call replaces N Python-level calls. They work **in place** (and return ``x``):
on the CPU a chunk of images then stays in the L2 cache from the first stage to the last, and
no large temporaries are allocated. The formulas avoid boolean tensors and ``torch.where``, which
run an order of magnitude slower than arithmetic on CPUs.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["GRAY_WEIGHTS", "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation",
           "apply_where", "blend", "gaussian_blur", "gaussian_kernels", "grayscale", "runs", "solarize"]

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, torchvision's and PIL's
GEMM_BLOCKS = (16, 8)  # single images whose sides divide by one of these blur by banded matrix products
BLUR_TAIL = 1e-4  # blur taps whose weight is below this (in every sample of a chunk) are skipped


def _each(values: torch.Tensor | Sequence[float] | float, x: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars shaped to broadcast over (N, C, H, W)."""
    if not isinstance(values, torch.Tensor):
        values = torch.tensor(values, dtype=x.dtype)
    if values.device != x.device or values.dtype != x.dtype:
        values = values.to(device=x.device, dtype=x.dtype)
    return values.view(-1, 1, 1, 1)


def _floats(values: torch.Tensor | Sequence[float] | float | None) -> list[float] | None:
    if values is None or isinstance(values, list):
        return values
    if isinstance(values, torch.Tensor):
        return values.reshape(-1).tolist()
    return [float(v) for v in values] if isinstance(values, (tuple, range)) else [float(values)]


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma, by torchvision's own sequence of float operations."""
    gray = x[:, 0:1] * GRAY_WEIGHTS[0]
    return gray.add_(x[:, 1:2], alpha=GRAY_WEIGHTS[1]).add_(x[:, 2:3], alpha=GRAY_WEIGHTS[2])


def _planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x[:, 0:1], x[:, 1:2], x[:, 2:3]


def blend(x: torch.Tensor, alpha, beta=None, gamma=None, *, bound: float = 1.0, clamp: bool = True) -> torch.Tensor:
    """``clamp(alpha * x + beta * mean_luma(x) + gamma * luma(x))`` per sample, in place.

    Brightness (alpha = f), contrast (alpha = f, beta = 1 - f), saturation (alpha = f,
    gamma = 1 - f) and the identity (alpha = 1) are all of this form, so one call applies a
    different one of them to each sample. The factors: (N,) tensors or sequences of floats;
    ``None`` for beta or gamma: zero for every sample (the mean or the luma plane is then not
    computed). ``clamp=False`` when no result can leave [0, bound] (every sample a convex
    combination, or a brightness factor <= 1). One image on the CPU takes plain floats
    (``lerp_`` with a float weight: one pass for a blend).
    """
    alpha, beta, gamma = _floats(alpha), _floats(beta), _floats(gamma)
    if len(alpha) == 1 and x.device.type == "cpu":
        _blend_one(x, alpha[0], beta[0] if beta else 0.0, gamma[0] if gamma else 0.0)
        return x.clamp_(0, bound) if clamp else x
    other = None
    if gamma is not None and any(gamma):
        other = grayscale(x).mul_(_each(gamma, x))
    if beta is not None and any(beta):
        weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
        mean = (x.mean(dim=(2, 3)) @ weights).view(-1, 1, 1, 1).mul_(_each(beta, x))
        if other is None:
            other = mean
        else:
            other.add_(mean)
    x.mul_(_each(alpha, x))  # binary in-place ops: three-operand broadcasts (addcmul) run several times slower
    if other is not None:
        x.add_(other)  # a value or a plane per sample, broadcast over the channels
    return x.clamp_(0, bound) if clamp else x


def _mean_luma(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    return (x.mean(dim=(2, 3)) @ weights).view(-1, 1, 1, 1)


def _blend_one(x: torch.Tensor, alpha: float, beta: float, gamma: float) -> None:
    """``blend`` of a single image, unclamped."""
    if beta == 0.0 and gamma == 0.0:
        if alpha != 1.0:
            x.mul_(alpha)
        return
    mean = _mean_luma(x) if beta else None
    gray = grayscale(x) if gamma else None
    if abs(alpha + beta + gamma - 1.0) < 1e-6 and (beta == 0.0 or gamma == 0.0):  # contrast or saturation
        x.lerp_(mean if gray is None else gray, beta if gray is None else gamma)
        return
    if gray is not None and mean is not None:
        gray.mul_(gamma).add_(mean, alpha=beta)
        gamma, mean = 1.0, None
    x.mul_(alpha)
    if gray is not None:
        x.add_(gray, alpha=gamma)
    if mean is not None:
        x.add_(mean.mul_(beta))


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor, *, bound: float = 1.0) -> torch.Tensor:
    """Blend with black: ``x * factor``, clamped."""
    return x.mul_(_each(factor, x)).clamp_(0, bound)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor, *, bound: float = 1.0) -> torch.Tensor:
    """Blend with the image's mean luma."""
    factor = torch.as_tensor(factor)
    return blend(x, factor, beta=1 - factor, bound=bound)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor, *, bound: float = 1.0) -> torch.Tensor:
    """Blend with the image's own luma."""
    factor = torch.as_tensor(factor)
    return blend(x, factor, gamma=1 - factor, bound=bound)


_OFFSETS = (5.0, 3.0, 1.0)  # where R, G, B sit on the hue circle, in sixths of a turn


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns (in [-0.5, 0.5]), keeping saturation and value.

    The result of RGB -> HSV -> (h + shift) mod 1 -> RGB, without materialising HSV or dividing.
    Value ``mx`` (the max), ``mn`` (the min) and chroma ``c = mx - mn`` are unchanged by the
    rotation. With ``d = c * h6`` (h6: the hue in sixths, torchvision's branches: g - b where R
    is the max, b - r + 2c where G is, r - g + 4c otherwise), channel k of the result is
    ``mx - c * clamp(min(t, 4 - t), 0, 1)`` at ``t = (n_k + h6 + 6 shift) mod 6`` (n = 5, 3, 1).
    Taking ``a_k = (n_k + 6 shift - 1) mod 6 + 1`` puts ``c * t`` in [0, 12c), where that
    periodic trapezoid equals ``clamp(| |c*t - 5c| - 3c | + mn - c, mn, mx)``.
    """
    n = x.shape[0]
    r, g, b = _planes(x)
    mx = torch.maximum(r, g)  # faster than amax over the channels
    torch.maximum(mx, b, out=mx)
    mn = torch.minimum(r, g)
    torch.minimum(mn, b, out=mn)
    c = mx - mn
    d = torch.sub(r, g).add_(c, alpha=4)  # where B is the max
    tmp = torch.sub(b, r).add_(c, alpha=2)  # where G is
    mask = torch.eq(g, mx, out=torch.empty_like(mx))  # float masks: boolean ones are slow
    d.lerp_(tmp, mask)
    torch.sub(g, b, out=tmp)  # where R is (R first on ties, as torchvision)
    d.lerp_(tmp, torch.eq(r, mx, out=mask))
    low = torch.sub(mn, c, out=mask)  # mn - c
    shifts = shift.tolist() if isinstance(shift, torch.Tensor) else list(shift)
    a = [[(o + 6 * s - 1) % 6 + 1 - 5 for o in _OFFSETS] for s in shifts]  # a_k - 5 per sample
    a = torch.tensor(a, dtype=x.dtype).to(x.device).view(n, 3, 1, 1)
    # x's values are no longer needed: all channels at once, in place (binary in-place ops broadcast a
    # plane over the channels faster than three per-plane calls)
    torch.mul(c, a, out=x).add_(d)  # c * t_k - 5c
    x.abs_().sub_(c, alpha=3).abs_().add_(low)
    return torch.clamp(x, min=mn, max=mx, out=x)


def solarize(x: torch.Tensor, threshold: float = 128 / 255, *, bound: float = 1.0) -> torch.Tensor:
    """Invert (``bound - x``) the pixels at or above ``threshold`` (PIL's ``ImageOps.solarize``
    uses 128 of 255), in place."""
    above = torch.ge(x, threshold, out=torch.empty_like(x))
    return x.add_(above.mul_(bound - 2 * x))


def gaussian_kernels(sigma: torch.Tensor | Sequence[float], kernel_size: int) -> torch.Tensor:
    """(N,) sigmas -> (N, kernel_size) normalised 1-D Gaussians on torchvision's integer grid, as
    float32 on the CPU (computed in numpy's float64: a few small torch ops would cost more than
    the blur of a 32 px image)."""
    grid = np.arange(kernel_size) - kernel_size // 2
    pdf = np.exp(-0.5 * (grid / np.asarray(_floats(sigma)).reshape(-1, 1)) ** 2)
    return torch.from_numpy((pdf / pdf.sum(axis=1, keepdims=True)).astype(np.float32))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma, as torchvision's ``gaussian_blur``
    (reflect padding, its normalised ``kernel_size`` taps), in place.

    Taps whose weight is below ``BLUR_TAIL`` in every sample are skipped (they change the result
    by less than 1e-3 of the value range; 2/255 is 8e-3): a 23-tap kernel of sigma 1 uses 11.
    A single CPU image whose sides divide by a ``GEMM_BLOCKS`` size blurs by banded matrix
    products (``_blur_gemm``); otherwise each pass is one multiply-add per tap over the chunk.
    Both passes run on the padded images flattened to one row per sample, so every tap reads
    a contiguous shifted slice (the horizontal pass also computes, and the end discards, the
    2r padding columns of each row); per-sample weights are broadcast factors (plain floats
    for a single image, the fastest form).
    """
    n, c, h, w = x.shape
    half = kernel_size // 2
    if half >= min(h, w):
        raise ValueError(f"a blur kernel of {kernel_size} taps needs images larger than {half} px")
    kernels = gaussian_kernels(sigma, kernel_size)
    used = np.flatnonzero((kernels.numpy() >= BLUR_TAIL).any(0))
    r = int(max(half - used[0], used[-1] - half)) if len(used) else 0
    if r == 0:
        return x.mul_(_each(kernels[:, half], x))
    taps = kernels[:, half - r:half + r + 1]
    block = next((b for b in GEMM_BLOCKS if h % b == 0 and w % b == 0 and _bottom_padding(h, r, b) < h), None)
    if n == 1 and x.device.type == "cpu" and block and torch.get_float32_matmul_precision() == "highest":
        return _blur_gemm(x, taps[0].to(x.dtype), r, block)
    weights = taps[0].tolist() if n == 1 else list(taps.to(x.device, x.dtype).t().reshape(-1, n, 1).unbind(0))
    hp, wp = h + 2 * r, w + 2 * r
    flat = F.pad(x, (r, r, r, r), mode="reflect").view(n, -1)
    length = flat.shape[1] - 2 * r  # the horizontal pass: index i of `rows` is padded pixel i
    rows = torch.mul(flat[:, 0:length], weights[0])
    for i in range(1, 2 * r + 1):
        _axpy(rows, flat[:, i:i + length], weights[i])
    length -= 2 * r * wp  # the vertical pass, into the padded layout: rows of hp-2r then unused
    out = torch.empty(n, c * hp * wp, device=x.device, dtype=x.dtype)
    cols = out[:, 0:length]
    torch.mul(rows[:, 0:length], weights[0], out=cols)
    for i in range(1, 2 * r + 1):
        _axpy(cols, rows[:, i * wp:i * wp + length], weights[i])
    return x.copy_(out.view(n, c, hp, wp)[:, :, :h, :w])


def _toeplitz(taps: torch.Tensor, block: int) -> torch.Tensor:
    """(block + 2r, block) matrix T with ``row @ T`` = the row's ``block`` outputs from its
    ``block + 2r`` inputs: T[m + i, m] = taps[i]."""
    r = (len(taps) - 1) // 2
    matrix = torch.zeros(block + 2 * r, block, dtype=taps.dtype)
    matrix.as_strided((block, 2 * r + 1), (block + 1, block)).copy_(taps.expand(block, -1))
    return matrix


def _bottom_padding(h: int, r: int, block: int) -> int:
    """``_blur_gemm``'s bottom padding: r reflected rows and as many more as make the padded
    channel a whole number of row blocks (a reflection needs it below ``h``)."""
    return -(-(h + 2 * r) // block) * block - h - r


def _blur_gemm(x: torch.Tensor, taps: torch.Tensor, r: int, block: int) -> torch.Tensor:
    """One image's blur as small matrix products: each block of ``block`` output rows (then
    columns) is its ``block + 2r`` input rows times a banded (Toeplitz) matrix, read from strided
    views of the padded image (no copies). The bottom padding is stretched so that channels lie
    a whole number of row blocks apart: each pass is then one batched product over all channels
    (the few windows straddling two channels are computed and discarded), and one copy puts
    the result back. About half the time of the tap loop at 224 px, whatever the sigma."""
    _, c, h, w = x.shape
    wp = w + 2 * r
    bottom = _bottom_padding(h, r, block)
    blocks = (h + r + bottom) // block  # row blocks per padded channel
    padded = F.pad(x, (r, r, r, bottom), mode="reflect")[0]
    across = _toeplitz(taps, block)
    nw, windows = w // block, (c - 1) * blocks + h // block
    rows = torch.empty(c * blocks * block, wp, dtype=x.dtype)  # vertical pass: row blocks in place
    torch.matmul(across.t(), padded.as_strided((windows, block + 2 * r, wp), (block * wp, wp, 1)),
                 out=rows[:windows * block].view(windows, block, wp))
    out = torch.matmul(rows.as_strided((nw, c * blocks * block, block + 2 * r), (block, wp, 1)), across)
    x[0].view(c, h, nw, block).copy_(out.view(nw, c, blocks * block, block)[:, :, :h].permute(1, 2, 0, 3))
    return x


def _axpy(out: torch.Tensor, x: torch.Tensor, weight: float | torch.Tensor) -> None:
    if isinstance(weight, torch.Tensor):
        out.addcmul_(x, weight)
    else:
        out.add_(x, alpha=weight)


def runs(mask: Sequence[bool]) -> list[tuple[int, int]]:
    """The [start, stop) runs of consecutive True entries."""
    out, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return out


MAX_RUNS = 4  # more runs of selected samples than this: gather them instead


def apply_where(x: torch.Tensor, mask: Sequence[bool] | torch.Tensor, op: Callable[..., torch.Tensor],
                *params: torch.Tensor) -> torch.Tensor:
    """``op`` on the samples selected by ``mask`` (with their own ``params``); the rest unchanged.

    Only the selected samples are computed: an op applied with probability p costs p of a batch.
    Runs of consecutive selected samples are computed in place on views of ``x`` (the batched
    pipeline sorts samples so that they form few runs); scattered ones are gathered, computed
    and written back. ``op`` may work in place and must return its result.
    """
    if isinstance(mask, torch.Tensor):
        mask = mask.tolist()
    spans = runs(mask)
    if not spans:
        return x
    if len(spans) <= MAX_RUNS:
        for start, stop in spans:
            part = x[start:stop]
            result = op(part, *(p[start:stop] for p in params))
            if result.data_ptr() != part.data_ptr():
                part.copy_(result)
        return x
    idx = torch.tensor([i for i, m in enumerate(mask) if m], device=x.device)
    picked = [p.to(x.device)[idx] for p in params]
    return x.index_copy_(0, idx, op(x.index_select(0, idx), *picked))
