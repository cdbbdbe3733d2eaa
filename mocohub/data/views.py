"""One view of an augmentation recipe, described once and run two ways.

A ``View`` is the official pipeline's steps in the official order: a RandomResizedCrop then
stages (flip, colour jitter, grayscale, blur, solarize). Each stage builds its PIL transform
(``pil``), draws its parameters from torch's global generator exactly as that torchvision
transform does, in the same order and with the same conditional draws (``sample``, by torch
calls; ``draw``, the same values computed from one read of the generator, see ``draws.py``), and
applies itself in place to a chunk of float images given those parameters (``apply``). So for
the same seed the batched pipeline uses the very parameters the PIL pipeline would have drawn.

A view's parameters travel as one float row of ``NUM_PARAMS`` values (``pack``/``unpack``
convert to and from the named form), so a sample's two views are one (2, NUM_PARAMS) tensor and
a batch's one (N, 2, NUM_PARAMS) tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import math
from functools import cached_property, lru_cache

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from . import photometric as P
from .draws import Words, exp32

__all__ = ["Blur", "ColorJitter", "Flip", "GaussianBlur", "Grayscale", "NUM_PARAMS", "Solarize", "Stage", "View",
           "blur_kernel_size", "pack", "unpack"]

Params = dict[str, torch.Tensor]
Row = list  # a view's parameters as floats, laid out by SLOTS

SLOTS = {"flip": 0, "jitter": 1, "jitter_order": slice(2, 6), "jitter_factors": slice(6, 10), "gray": 10,
         "blur_sigma": 11, "solarize": 12}
NUM_PARAMS = 13
NEUTRAL = (0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)  # what a stage a view lacks leaves
_FLIP, _JITTER, _ORDER, _FACTORS, _GRAY, _SIGMA, _SOLARIZE = 0, 1, slice(2, 6), slice(6, 10), 10, 11, 12
_FLAGS = ("flip", "jitter", "gray", "solarize")


def pack(params: Params) -> torch.Tensor:
    """Named parameters (``View.sample``'s) -> one float row of ``NUM_PARAMS``."""
    row = torch.tensor(NEUTRAL)
    for name, value in params.items():
        row[SLOTS[name]] = value.float() if isinstance(value, torch.Tensor) else value
    return row


def unpack(packed: torch.Tensor) -> Params:
    """Rows (..., NUM_PARAMS) -> named parameters with a leading batch shape: the flags as bool,
    the jitter order as int64, the factors and sigma as float."""
    out = {name: packed[..., where] for name, where in SLOTS.items()}
    for name in _FLAGS:
        out[name] = out[name] > 0.5
    out["jitter_order"] = out["jitter_order"].long()
    return out


def _rand() -> float:
    return torch.rand(1).item()


def _applied(p: float) -> bool:
    """torchvision's ``RandomApply`` coin: applied unless ``p < rand``."""
    return not p < _rand()


def blur_kernel_size(size: int) -> int:
    """The SimCLR / MoCo v3 convention for a Gaussian blur kernel: about 10% of the image, odd."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


class GaussianBlur:
    """PIL Gaussian blur with sigma ~ U[sigma_min, sigma_max] (SimCLR's, as MoCo v2 uses it).

    Sigma is drawn from torch's generator so seeding torch makes every view reproducible.
    """

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        self.sigma = tuple(sigma)

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


class PILSolarize:
    """MoCo v3's ``Solarize``: PIL's ``ImageOps.solarize`` (inverts pixels >= 128)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Stage:
    """One random step after the crop. ``geometric`` stages run per sample in the loader worker.

    ``apply(x, rows, bound)``: in place on a float chunk (N, 3, H, W) with values in [0, bound],
    ``rows`` the chunk's parameter rows as Python lists (decisions are taken on the host, so
    a GPU chunk never waits on a device-to-host copy).
    """

    geometric: ClassVar[bool] = False
    max_words: ClassVar[int] = 1  # the most generator words ``draw`` can use

    def pil(self) -> Callable:
        raise NotImplementedError

    def sample(self) -> Params:
        raise NotImplementedError

    def draw(self, words: Words, row: Row) -> None:
        """``sample``'s values, from ``words``, into the view's ``row``."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, rows: list[Row], bound: float = 1.0) -> torch.Tensor:
        raise NotImplementedError


def _column(rows: list[Row], name: str) -> list:
    return [row[SLOTS[name]] for row in rows]


@dataclass(frozen=True)
class Flip(Stage):
    p: float = 0.5
    geometric: ClassVar[bool] = True

    def pil(self) -> Callable:
        return T.RandomHorizontalFlip(self.p)

    def sample(self) -> Params:
        return {"flip": torch.tensor(_rand() < self.p)}

    def draw(self, words: Words, row: Row) -> None:
        row[_FLIP] = float(words.rand() < self.p)


@dataclass(frozen=True)
class ColorJitter(Stage):
    """ColorJitter(brightness, contrast, saturation, hue), applied with probability ``p``
    (``None``: always, without drawing a coin, as a bare ``T.ColorJitter`` does)."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    p: float | None = None
    NEUTRAL: ClassVar[tuple] = (1.0, 1.0, 1.0, 0.0)
    max_words: ClassVar[int] = 1 + 3 + 4  # the coin, randperm(4), four factors

    def _ranges(self) -> list[tuple[float, float] | None]:
        return [(max(0.0, 1 - s), 1 + s) if s else None for s in (self.brightness, self.contrast, self.saturation)] \
            + [(-self.hue, self.hue) if self.hue else None]

    def pil(self) -> Callable:
        jitter = T.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue)
        return jitter if self.p is None else T.RandomApply([jitter], p=self.p)

    def sample(self) -> Params:
        """``T.ColorJitter.get_params``'s draws: the order (a permutation of the 4 ops), then each
        enabled factor uniformly in its range. A skipped jitter draws nothing more."""
        on = self.p is None or _applied(self.p)
        order, factors = torch.arange(4), torch.tensor(self.NEUTRAL)
        if on:
            order = torch.randperm(4)
            for i, bounds in enumerate(self._ranges()):
                if bounds is not None:
                    factors[i] = torch.empty(1).uniform_(*bounds).item()
        return {"jitter": torch.tensor(on), "jitter_order": order, "jitter_factors": factors}

    @cached_property
    def _bounds(self) -> list[tuple[int, float, float]]:
        return [(i, *bounds) for i, bounds in enumerate(self._ranges()) if bounds is not None]

    def draw(self, words: Words, row: Row) -> None:
        if self.p is not None and self.p < words.rand():
            return
        row[_JITTER] = 1.0
        row[_ORDER] = words.randperm4()
        for i, low, high in self._bounds:
            row[_FACTORS.start + i] = words.uniform(low, high)

    def apply(self, x: torch.Tensor, rows: list[Row], bound: float = 1.0) -> torch.Tensor:
        """At each of the 4 positions, each sample runs the op its order puts there. Brightness,
        contrast and saturation are all blends (``P.blend``), so one call runs whichever of them
        each sample has at that position; hue runs on the samples that have it there (the
        batched pipeline sorts a chunk's samples by their hue position: one run, in place)."""
        enabled = [bounds is not None for bounds in self._ranges()]
        first = SLOTS["jitter_order"].start
        factor0 = SLOTS["jitter_factors"].start
        if len(rows) == 1 and x.device.type == "cpu":
            row = rows[0]
            if row[SLOTS["jitter"]] > 0.5:
                ops = [int(op) for op in row[first:first + 4]]
                _jitter_one(x, [(op, row[factor0 + op]) for op in ops if enabled[op]], bound)
            return x
        for position in range(4):
            alpha, beta, gamma, shifts, hue = [], [], [], [], []
            clamp = False
            for row in rows:
                op = int(row[first + position]) if row[SLOTS["jitter"]] > 0.5 else -1
                op = op if op >= 0 and enabled[op] else -1
                f = row[factor0 + op] if op >= 0 else 0.0
                alpha.append(f if 0 <= op <= 2 else 1.0)
                beta.append(1.0 - f if op == 1 else 0.0)
                gamma.append(1.0 - f if op == 2 else 0.0)
                clamp = clamp or (0 <= op <= 2 and f > 1.0)
                hue.append(op == 3)
                shifts.append(f if op == 3 else 0.0)
            if any(a != 1.0 for a in alpha):
                P.blend(x, torch.tensor(alpha), torch.tensor(beta) if any(beta) else None,
                        torch.tensor(gamma) if any(gamma) else None, bound=bound, clamp=clamp)
            if any(hue):
                P.apply_where(x, hue, P.adjust_hue, torch.tensor(shifts))
        return x


def _jitter_one(x: torch.Tensor, ops: list[tuple[int, float]], bound: float) -> None:
    """One image's jitter, ops (id, factor) in order, merging runs of blends into one.

    Brightness, contrast and saturation are each ``alpha x + beta mean_luma(x) + gamma luma(x)``
    then a clamp, and a factor <= 1 never needs the clamp (a blend of values in range, or a
    darkening). So a run of them whose every op but the last has a factor <= 1 composes into one
    blend (luma and mean luma of a blend are the same blend of them: the luma weights sum to
    1 up to 1e-4), clamped once at the end: one pass for the run instead of one per op.
    """
    alpha, beta, gamma = 1.0, 0.0, 0.0  # the pending blend of x, not yet applied
    for op, f in ops:
        if op == 3:
            _flush_blend(x, alpha, beta, gamma, bound)
            alpha, beta, gamma = 1.0, 0.0, 0.0
            P.adjust_hue(x, [f])
            continue
        a, b, g = (f, 0.0, 0.0) if op == 0 else (f, 1 - f, 0.0) if op == 1 else (f, 0.0, 1 - f)
        alpha, beta, gamma = (a * alpha, a * beta + b * (alpha + beta + gamma) + g * beta,
                              a * gamma + g * (alpha + gamma))
        if f > 1.0:  # the result may leave the range: clamp it before anything else
            _flush_blend(x, alpha, beta, gamma, bound, clamp=True)
            alpha, beta, gamma = 1.0, 0.0, 0.0
    _flush_blend(x, alpha, beta, gamma, bound)


def _flush_blend(x: torch.Tensor, alpha: float, beta: float, gamma: float, bound: float, clamp: bool = False) -> None:
    if alpha != 1.0 or beta or gamma:
        P.blend(x, [alpha], [beta], [gamma], bound=bound, clamp=clamp)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(P.grayscale(x).expand_as(x))


@dataclass(frozen=True)
class Grayscale(Stage):
    p: float = 0.2

    def pil(self) -> Callable:
        return T.RandomGrayscale(self.p)

    def sample(self) -> Params:
        return {"gray": torch.tensor(_rand() < self.p)}

    def draw(self, words: Words, row: Row) -> None:
        row[_GRAY] = float(words.rand() < self.p)

    def apply(self, x: torch.Tensor, rows: list[Row], bound: float = 1.0) -> torch.Tensor:
        return P.apply_where(x, [g > 0.5 for g in _column(rows, "gray")], _gray)


@dataclass(frozen=True)
class Blur(Stage):
    """Gaussian blur with sigma ~ U[sigma], applied with probability ``p``.

    The PIL pipeline blurs with ``ImageFilter.GaussianBlur(radius=sigma)`` (PIL's box-blur
    approximation), as the official code; the batched one with an exact Gaussian of
    ``blur_kernel_size(image size)`` taps (23 at 224 px), as torchvision's ``GaussianBlur``.
    """

    p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    max_words: ClassVar[int] = 2

    def pil(self) -> Callable:
        return T.RandomApply([GaussianBlur(self.sigma)], p=self.p)

    def sample(self) -> Params:
        sigma = torch.empty(1).uniform_(*self.sigma).item() if _applied(self.p) else 0.0
        return {"blur_sigma": torch.tensor(sigma)}

    def draw(self, words: Words, row: Row) -> None:
        if not self.p < words.rand():
            row[_SIGMA] = words.uniform(*self.sigma)

    def apply(self, x: torch.Tensor, rows: list[Row], bound: float = 1.0) -> torch.Tensor:
        sigma = _column(rows, "blur_sigma")
        size = blur_kernel_size(x.shape[-1])
        return P.apply_where(x, [s > 0 for s in sigma], lambda y, s: P.gaussian_blur(y, s, size), torch.tensor(sigma))


@dataclass(frozen=True)
class Solarize(Stage):
    p: float = 0.2

    def pil(self) -> Callable:
        return T.RandomApply([PILSolarize()], p=self.p)

    def sample(self) -> Params:
        return {"solarize": torch.tensor(_applied(self.p))}

    def draw(self, words: Words, row: Row) -> None:
        row[_SOLARIZE] = float(not self.p < words.rand())

    def apply(self, x: torch.Tensor, rows: list[Row], bound: float = 1.0) -> torch.Tensor:
        return P.apply_where(x, [s > 0.5 for s in _column(rows, "solarize")],
                             lambda y: P.solarize(y, 128 / 255 * bound, bound=bound))


@lru_cache(maxsize=None)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    """``torch.log(torch.tensor(ratio))``, as RandomResizedCrop.get_params computes it (float32)."""
    low, high = torch.log(torch.tensor(ratio)).tolist()
    return low, high


@dataclass(frozen=True)
class View:
    """RandomResizedCrop(size, scale, ratio), then ``stages`` in order."""

    size: int
    scale: tuple[float, float]
    stages: tuple[Stage, ...]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def pil(self) -> list[Callable]:
        return [T.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio),
                *(stage.pil() for stage in self.stages)]

    @property
    def max_words(self) -> int:
        """The most generator words ``draw`` can use: 10 crop tries of 2, the offsets, the stages."""
        return 22 + sum(stage.max_words for stage in self.stages)

    def sample(self, image: torch.Tensor) -> tuple[tuple[int, int, int, int], Params]:
        """The crop box (top, left, height, width) by ``T.RandomResizedCrop.get_params`` itself,
        then every stage's parameters, in the PIL pipeline's order of draws (torch calls)."""
        box = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        params: Params = {}
        for stage in self.stages:
            params.update(stage.sample())
        return box, params

    def draw(self, words: Words, height: int, width: int) -> tuple[tuple[int, int, int, int], Row]:
        """``sample``'s box and parameters (as a row), computed from ``words``."""
        return self._crop_box(words, height, width), self._draw_stages(words)

    def _draw_stages(self, words: Words) -> Row:
        row = list(NEUTRAL)
        for stage in self.stages:
            stage.draw(words, row)
        return row

    def _crop_box(self, words: Words, height: int, width: int) -> tuple[int, int, int, int]:
        """``T.RandomResizedCrop.get_params``, line by line."""
        area = height * width
        log_ratio = _log_ratio(self.ratio)
        for _ in range(10):
            target_area = area * words.uniform(*self.scale)
            aspect_ratio = exp32(words.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                return words.randint(height - h + 1), words.randint(width - w + 1), h, w
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def photometric(self, x: torch.Tensor, rows: list[Row], bound: float = 1.0) -> torch.Tensor:
        """The non-geometric stages, in order, in place on a float chunk in [0, bound]."""
        for stage in self.stages:
            if not stage.geometric:
                x = stage.apply(x, rows, bound)
        return x
