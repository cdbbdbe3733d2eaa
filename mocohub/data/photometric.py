"""Photometric augmentations on a whole batch at once, each sample with its own parameters.

Every function takes float images ``x`` of shape (N, 3, H, W) with values in [0, ``bound``]
(1 for torchvision's float images; the batched pipeline works in [0, 255], straight from the uint8
crops) and per-sample parameter tensors of shape (N,), and computes what
``torchvision.transforms.v2.functional`` computes on each image alone (same formulas, same
clamping), so one call replaces N Python-level calls. They work **in place** (and return ``x``):
on the CPU a chunk of images then stays in the L2 cache from the first stage to the last, and
no large temporaries are allocated. The formulas avoid boolean tensors and ``torch.where``, which
run an order of magnitude slower than arithmetic on CPUs.

Nothing here reads a tensor back to the host or copies a parameter to the device by itself:
per-sample factors arrive as tensors on the images' device (or plain floats for one CPU image),
and every choice (which samples, how many taps) is made from host arrays (``transfer.py``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .transfer import to_device

__all__ = ["GRAY_WEIGHTS", "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation",
           "apply_where", "blend", "blend_one", "blur", "blur_radius", "gaussian_blur", "gaussian_kernels",
           "grayscale", "runs", "solarize"]

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, torchvision's and PIL's
GEMM_BLOCKS = (16, 8)  # single images whose sides divide by one of these blur by banded matrix products
BLUR_TAIL = 1e-4  # Gaussian taps whose weight is below this are zero


def _each(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample factors (N,), already on ``x``'s device, shaped to broadcast over (N, C, H, W)."""
    return values.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma, by torchvision's own sequence of float operations."""
    gray = x[:, 0:1] * GRAY_WEIGHTS[0]
    return gray.add_(x[:, 1:2], alpha=GRAY_WEIGHTS[1]).add_(x[:, 2:3], alpha=GRAY_WEIGHTS[2])


def _planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x[:, 0:1], x[:, 1:2], x[:, 2:3]


def blend(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
          *, bound: float = 1.0, clamp: bool = True) -> torch.Tensor:
    """``clamp(alpha * x + beta * mean_luma(x) + gamma * luma(x))`` per sample, in place.

    Brightness (alpha = f), contrast (alpha = f, beta = 1 - f), saturation (alpha = f,
    gamma = 1 - f) and the identity (alpha = 1) are all of this form, so one call applies a
    different one of them to each sample. The factors: (N,) tensors on ``x``'s device; ``None``
    for beta or gamma: zero for every sample (the mean or the luma plane is then not computed).
    ``clamp=False`` when no result can leave [0, bound] (every sample a convex combination, or a
    brightness factor <= 1).
    """
    other = None
    if gamma is not None:
        other = grayscale(x).mul_(_each(gamma, x))
    if beta is not None:
        mean = _mean_luma(x).mul_(_each(beta, x))
        other = mean if other is None else other.add_(mean)
    x.mul_(_each(alpha, x))  # binary in-place ops: three-operand broadcasts (addcmul) run several times slower
    if other is not None:
        x.add_(other)  # a value or a plane per sample, broadcast over the channels
    return x.clamp_(0, bound) if clamp else x


@lru_cache(maxsize=None)
def _luma_weights(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``GRAY_WEIGHTS`` on ``device``, copied there once per process."""
    return to_device(torch.tensor(GRAY_WEIGHTS, dtype=dtype), device)


def _mean_luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 1, 1): the luma of the channel means (the mean of the luma, as torchvision's contrast)."""
    return (x.mean(dim=(2, 3)) @ _luma_weights(x.device, x.dtype)).view(-1, 1, 1, 1)


def blend_one(x: torch.Tensor, alpha: float, beta: float, gamma: float, *, bound: float = 1.0,
              clamp: bool = True) -> torch.Tensor:
    """``blend`` of a single image with plain floats (a contrast or saturation is one ``lerp_``)."""
    mean = _mean_luma(x) if beta else None
    gray = grayscale(x) if gamma else None
    if mean is None and gray is None:
        if alpha != 1.0:
            x.mul_(alpha)
    elif abs(alpha + beta + gamma - 1.0) < 1e-6 and (mean is None or gray is None):  # contrast or saturation
        x.lerp_(mean if gray is None else gray, beta if gray is None else gamma)
    else:
        if gray is not None and mean is not None:
            gray.mul_(gamma).add_(mean, alpha=beta)
            gamma, mean = 1.0, None
        x.mul_(alpha)
        if gray is not None:
            x.add_(gray, alpha=gamma)
        if mean is not None:
            x.add_(mean.mul_(beta))
    return x.clamp_(0, bound) if clamp else x


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor, *, bound: float = 1.0) -> torch.Tensor:
    """Blend with black: ``x * factor``, clamped."""
    return blend(x, factor, bound=bound)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor, *, bound: float = 1.0) -> torch.Tensor:
    """Blend with the image's mean luma."""
    return blend(x, factor, beta=1 - factor, bound=bound)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor, *, bound: float = 1.0) -> torch.Tensor:
    """Blend with the image's own luma."""
    return blend(x, factor, gamma=1 - factor, bound=bound)


_OFFSETS = (5.0, 3.0, 1.0)  # where R, G, B sit on the hue circle, in sixths of a turn


def adjust_hue(x: torch.Tensor, shift: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns (in [-0.5, 0.5]: an (N,) tensor on ``x``'s device, or
    floats for CPU images), keeping saturation and value.

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
    if isinstance(shift, torch.Tensor):  # a_k - 5 = (n_k + 6 shift - 1) mod 6 - 4, on the device
        a = torch.stack([torch.remainder(shift * 6 + (o - 1), 6) for o in _OFFSETS], 1).sub_(4).view(n, 3, 1, 1)
    else:  # one CPU image's float
        a = torch.tensor([[(o + 6 * s - 1) % 6 - 4 for o in _OFFSETS] for s in shift], dtype=x.dtype).view(n, 3, 1, 1)
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


def blur_radius(sigma: float, size: int) -> int:
    """Taps on each side that cover a Gaussian of ``sigma`` (3 sigma), limited by the image: PIL's
    ``GaussianBlur(radius=sigma)`` reaches as far (its box blurs add up to the same variance)."""
    return max(0, min(math.ceil(3 * sigma), size - 1))


def gaussian_kernels(sigma: np.ndarray | Sequence[float], radius: int) -> np.ndarray:
    """(N,) sigmas -> (N, 2 radius + 1) normalised 1-D Gaussians on the integer grid, float32 (a
    sigma of 0: the identity), computed in numpy's float64 (a few small torch ops would cost more
    than the blur of a 32 px image). Taps under ``BLUR_TAIL`` are zero (they change the result by
    less than 1e-3 of the value range; 2/255 is 8e-3): ``blur`` skips the columns zero in every
    sample of a chunk, and a sample's result does not depend on the others in its chunk."""
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1, 1)
    grid = np.arange(-radius, radius + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pdf = np.exp(-0.5 * (grid / sigma) ** 2)
    pdf[sigma[:, 0] <= 0] = grid == 0
    pdf /= pdf.sum(axis=1, keepdims=True)
    pdf[pdf < BLUR_TAIL] = 0.0
    return (pdf / pdf.sum(axis=1, keepdims=True)).astype(np.float32)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | Sequence[float], kernel_size: int | None = None) -> torch.Tensor:
    """``blur`` with each sample's Gaussian: ``kernel_size`` taps, or (None) as many as cover the
    largest sigma (``blur_radius``). ``sigma`` is on the host."""
    sigma = np.asarray(sigma.cpu() if isinstance(sigma, torch.Tensor) else sigma, dtype=np.float64).reshape(-1)
    radius = blur_radius(float(sigma.max()), min(x.shape[-2:])) if kernel_size is None else kernel_size // 2
    taps = gaussian_kernels(sigma, radius)
    return blur(x, taps, to_device(taps, x.device))


def blur(x: torch.Tensor, taps: np.ndarray, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Separable blur of each sample by its own odd kernel, edge pixels repeated beyond the border
    (as PIL's ``GaussianBlur``), in place. ``taps``: the (N, K) kernels on the host, which decide
    the width; ``weights``: the same on ``x``'s device (needed for chunks of several images).

    Columns of ``taps`` zero in every sample are skipped (``gaussian_kernels`` zeroes the tails).
    A single CPU image whose sides divide by a ``GEMM_BLOCKS`` size blurs by banded matrix
    products (``_blur_gemm``); otherwise each pass is one multiply-add per tap over the chunk.
    Both passes run on the padded images flattened to one row per sample, so every tap reads
    a contiguous shifted slice (the horizontal pass also computes, and the end discards, the
    2r padding columns of each row); per-sample weights are broadcast factors (plain floats
    for a single image, the fastest form).
    """
    n, c, h, w = x.shape
    half = taps.shape[1] // 2
    used = np.flatnonzero(taps.any(0))
    r = int(max(half - used[0], used[-1] - half)) if len(used) else 0
    single = n == 1 and x.device.type == "cpu"
    if single:
        weights = None
    elif weights is None:
        weights = torch.from_numpy(taps)
    if r == 0:
        return x.mul_(float(taps[0, half]) if single else _each(weights[:, half], x))
    host = taps[:, half - r:half + r + 1]
    block = next((b for b in GEMM_BLOCKS if h % b == 0 and w % b == 0), None)
    if single and block and torch.get_float32_matmul_precision() == "highest":
        return _blur_gemm(x, torch.from_numpy(host[0]).to(x.dtype), r, block)
    factors = host[0].tolist() if single else list(weights[:, half - r:half + r + 1].t().reshape(-1, n, 1).unbind(0))
    hp, wp = h + 2 * r, w + 2 * r
    flat = F.pad(x, (r, r, r, r), mode="replicate").view(n, -1)
    length = flat.shape[1] - 2 * r  # the horizontal pass: index i of `rows` is padded pixel i
    rows = torch.mul(flat[:, 0:length], factors[0])
    for i in range(1, 2 * r + 1):
        _axpy(rows, flat[:, i:i + length], factors[i])
    length -= 2 * r * wp  # the vertical pass, into the padded layout: rows of hp-2r then unused
    out = torch.empty(n, c * hp * wp, device=x.device, dtype=x.dtype)
    cols = out[:, 0:length]
    torch.mul(rows[:, 0:length], factors[0], out=cols)
    for i in range(1, 2 * r + 1):
        _axpy(cols, rows[:, i * wp:i * wp + length], factors[i])
    return x.copy_(out.view(n, c, hp, wp)[:, :, :h, :w])


def _toeplitz(taps: torch.Tensor, block: int) -> torch.Tensor:
    """(block + 2r, block) matrix T with ``row @ T`` = the row's ``block`` outputs from its
    ``block + 2r`` inputs: T[m + i, m] = taps[i]."""
    r = (len(taps) - 1) // 2
    matrix = torch.zeros(block + 2 * r, block, dtype=taps.dtype)
    matrix.as_strided((block, 2 * r + 1), (block + 1, block)).copy_(taps.expand(block, -1))
    return matrix


def _blur_gemm(x: torch.Tensor, taps: torch.Tensor, r: int, block: int) -> torch.Tensor:
    """One image's blur as small matrix products: each block of ``block`` output rows (then
    columns) is its ``block + 2r`` input rows times a banded (Toeplitz) matrix, read from strided
    views of the padded image (no copies). The bottom padding is stretched so that channels lie
    a whole number of row blocks apart: each pass is then one batched product over all channels
    (the few windows straddling two channels are computed and discarded), and one copy puts
    the result back. About half the time of the tap loop at 224 px, whatever the sigma."""
    _, c, h, w = x.shape
    wp = w + 2 * r
    bottom = -(-(h + 2 * r) // block) * block - h - r  # r repeated rows, and more up to whole row blocks
    blocks = (h + r + bottom) // block  # row blocks per padded channel
    padded = F.pad(x, (r, r, r, bottom), mode="replicate")[0]
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


def runs(mask: np.ndarray | Sequence[bool]) -> list[tuple[int, int]]:
    """The [start, stop) runs of consecutive True entries (a Python loop: masks are short, often of one sample)."""
    out, start = [], None
    for i, m in enumerate(mask.tolist() if isinstance(mask, np.ndarray) else mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return out


MAX_RUNS = 4  # more runs of selected samples than this: gather them instead


def apply_where(x: torch.Tensor, mask: np.ndarray | Sequence[bool], op: Callable[..., torch.Tensor],
                *params: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``op`` on the samples selected by the host ``mask`` (with their own ``params``: tensors on
    ``x``'s device or host arrays); the rest unchanged.

    Only the selected samples are computed: an op applied with probability p costs p of a batch.
    Runs of consecutive selected samples are computed in place on views of ``x`` (the batched
    pipeline sorts samples so that they form few runs); scattered ones are gathered, computed
    and written back. ``op`` may work in place and must return its result.
    """
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
    picked = np.flatnonzero(mask)
    idx = to_device(torch.from_numpy(picked), x.device)
    chosen = [p[picked] if isinstance(p, np.ndarray) else p.index_select(0, idx) for p in params]
    return x.index_copy_(0, idx, op(x.index_select(0, idx), *chosen))
