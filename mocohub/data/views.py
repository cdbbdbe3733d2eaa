"""One view of an augmentation recipe, described once and run two ways.

A ``View`` is the official pipeline's steps in the official order: a RandomResizedCrop, then
stages (flip, colour jitter, grayscale, blur, solarize). Each stage has three faces:

- ``pil()``: its torchvision / PIL transform, the reference pipeline (``two_views``, ``--aug-impl pil``);
- ``draw(u, size)``: its parameters for N samples from an (N, ``draws``) array of uniforms, with
  the distributions of that transform, as named host arrays (``Params``, samples first);
- ``apply(x, host, dev, bound)``: itself, in place, on a chunk of float images in [0, bound]:
  decisions from the ``host`` arrays, per-sample factors from ``dev`` (the float arrays on the
  images' device; None for a single CPU image, which takes plain floats).

A view's parameters are a ``ViewParams``: each stage's ``Params`` under its ``name`` (the crop
box under "crop"). Adding an op is one ``Stage`` here and its test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from . import photometric as P

__all__ = ["Blur", "CROP_DRAWS", "ColorJitter", "Flip", "GaussianBlur", "Grayscale", "Params", "Solarize", "Stage",
           "View", "ViewParams"]

Params = dict[str, np.ndarray]  # one stage's parameters, samples on the first axis
ViewParams = dict[str, Params]  # by stage name
DevParams = dict[str, torch.Tensor]  # a stage's float parameters on the images' device
CROP_DRAWS = 22  # RandomResizedCrop: 10 tries of (scale, log-ratio), then the top and left offsets
_CROP_TRIES = 10
_HEIGHT_WIDTH = np.array([-1.0, 1.0])


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


def _coin(u: np.ndarray, p: float) -> np.ndarray:
    """torchvision's coins: ``RandomApply`` skips when ``p < rand``, the random flip and grayscale
    apply when ``rand < p`` (the same but on a set of measure zero)."""
    return u < p


class Stage:
    """One random step after the crop. ``geometric`` stages run on the uint8 crop (the loader or
    the batch crop), the others in ``apply``."""

    name: ClassVar[str]
    geometric: ClassVar[bool] = False
    draws: ClassVar[int] = 1  # uniforms per sample

    def pil(self) -> Callable:
        raise NotImplementedError

    def draw(self, u: np.ndarray, size: int) -> Params:
        """Parameters for ``len(u)`` samples of views of ``size`` px from uniforms (N, draws); by
        default the coin of a stage applied with probability ``self.p``: ``on``."""
        return {"on": _coin(u[:, 0], self.p)}

    def apply(self, x: torch.Tensor, host: Params, dev: DevParams | None, bound: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def order_key(self, host: Params) -> np.ndarray:
        """What the CPU path sorts a batch by, so that the samples this stage applies to form runs."""
        return host["on"]

    def groups(self, host: Params) -> np.ndarray | None:
        """Labels a CPU chunk never mixes (None: any samples may share a chunk)."""
        return None


@dataclass(frozen=True)
class Flip(Stage):
    """Horizontal flip with probability ``p``, folded into the crop (the loader's copy, or the
    batch crop's weights)."""

    p: float = 0.5
    name: ClassVar[str] = "flip"
    geometric: ClassVar[bool] = True

    def pil(self) -> Callable:
        return T.RandomHorizontalFlip(self.p)


_JITTER_NEUTRAL = np.array([1.0, 1.0, 1.0, 0.0])  # brightness, contrast, saturation factors; hue shift
_HUE = 3


@dataclass(frozen=True)
class ColorJitter(Stage):
    """ColorJitter(brightness, contrast, saturation, hue), applied with probability ``p``
    (``None``: always, as a bare ``T.ColorJitter``)."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    p: float | None = None
    name: ClassVar[str] = "jitter"
    draws: ClassVar[int] = 1 + 4 + 4  # the coin, the order, the four factors

    def _ranges(self) -> np.ndarray:
        """(2, 4) low and high of each factor (equal, at the neutral value, for a disabled op)."""
        low = [max(0.0, 1 - s) if s else 1.0 for s in (self.brightness, self.contrast, self.saturation)]
        high = [1 + s if s else 1.0 for s in (self.brightness, self.contrast, self.saturation)]
        return np.array([low + [-self.hue], high + [self.hue]])

    def pil(self) -> Callable:
        jitter = T.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue)
        return jitter if self.p is None else T.RandomApply([jitter], p=self.p)

    def draw(self, u: np.ndarray, size: int) -> Params:
        """``T.ColorJitter.get_params``' distributions: the 4 ops in a uniformly random order (the
        ranks of 4 uniforms), each factor uniform in its range."""
        on = np.ones(len(u), dtype=bool) if self.p is None else _coin(u[:, 0], self.p)
        low, high = self._ranges()
        return self.params(on, np.argsort(u[:, 1:5], axis=1), low + u[:, 5:9] * (high - low))

    def params(self, on: np.ndarray, order: np.ndarray, factor: np.ndarray) -> Params:
        """The named parameters of given coins (N,), orders (N, 4: op ids, 0 brightness, 1 contrast,
        2 saturation, 3 hue) and factors (N, 4, by op id), with what ``apply`` runs at each of the 4
        positions: the blend ``alpha x + beta mean_luma + gamma luma`` (the identity where the op
        there is hue, disabled, or the jitter is off) and the hue shift (0 where it is not hue)."""
        factor = np.where(on[:, None], factor, _JITTER_NEUTRAL)
        enabled = np.array([self.brightness, self.contrast, self.saturation, self.hue]) != 0
        f = np.take_along_axis(factor, order, 1)
        active = on[:, None] & enabled[order]
        return {"on": on, "order": order, "factor": factor.astype(np.float32),
                "alpha": np.where(active & (order < _HUE), f, 1.0).astype(np.float32),
                "beta": np.where(active & (order == 1), 1 - f, 0.0).astype(np.float32),
                "gamma": np.where(active & (order == 2), 1 - f, 0.0).astype(np.float32),
                "hue_on": active & (order == _HUE),
                "hue": np.where(active & (order == _HUE), f, 0.0).astype(np.float32)}

    def apply(self, x: torch.Tensor, host: Params, dev: DevParams | None, bound: float = 1.0) -> torch.Tensor:
        """At each of the 4 positions every sample runs the op its order puts there: one blend call
        for brightness, contrast and saturation alike, hue on the samples that have it there (the
        CPU path sorts by hue position: one run)."""
        if dev is None:
            if host["on"][0]:
                _jitter_one(x, host, bound)
            return x
        for j in range(4):
            alpha, beta, gamma = host["alpha"][:, j], host["beta"][:, j], host["gamma"][:, j]
            if (alpha != 1).any() or beta.any() or gamma.any():
                P.blend(x, dev["alpha"][:, j], dev["beta"][:, j] if beta.any() else None,
                        dev["gamma"][:, j] if gamma.any() else None, bound=bound, clamp=bool((alpha > 1).any()))
            P.apply_where(x, host["hue_on"][:, j], P.adjust_hue, dev["hue"][:, j])
        return x

    def order_key(self, host: Params) -> np.ndarray:
        """Where the hue rotation sits in each sample's order (4: nowhere)."""
        hue_on = host["hue_on"]
        return np.where(hue_on.any(1), hue_on.argmax(1), 4)

    groups = order_key  # a chunk of one hue position: its hue is one run, and the blends skip that position


def _jitter_one(x: torch.Tensor, host: Params, bound: float) -> None:
    """One image's jitter in order, merging runs of blends into one pass.

    Brightness, contrast and saturation are each ``alpha x + beta mean_luma(x) + gamma luma(x)``
    then a clamp, and a factor <= 1 never needs the clamp (a blend of values in range, or a
    darkening). So a run of them whose every op but the last has a factor <= 1 composes into one
    blend (luma and mean luma of a blend are the same blend of them: the luma weights sum to
    1 up to 1e-4), clamped once at the end.
    """
    pending = (1.0, 0.0, 0.0)  # the blend of x not yet applied
    for a, b, g, hue_on, shift in zip(host["alpha"][0].tolist(), host["beta"][0].tolist(), host["gamma"][0].tolist(),
                                      host["hue_on"][0].tolist(), host["hue"][0].tolist()):
        if hue_on:
            _flush(x, pending, bound)
            pending = (1.0, 0.0, 0.0)
            P.adjust_hue(x, [shift])
            continue
        alpha, beta, gamma = pending
        pending = (a * alpha, a * beta + b * (alpha + beta + gamma) + g * beta, a * gamma + g * (alpha + gamma))
        if a > 1.0:  # the result may leave the range: clamp it before anything else
            _flush(x, pending, bound, clamp=True)
            pending = (1.0, 0.0, 0.0)
    _flush(x, pending, bound)


def _flush(x: torch.Tensor, blend: tuple[float, float, float], bound: float, clamp: bool = False) -> None:
    if blend != (1.0, 0.0, 0.0):
        P.blend_one(x, *blend, bound=bound, clamp=clamp)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(P.grayscale(x).expand_as(x))


@dataclass(frozen=True)
class Grayscale(Stage):
    p: float = 0.2
    name: ClassVar[str] = "gray"

    def pil(self) -> Callable:
        return T.RandomGrayscale(self.p)

    def apply(self, x: torch.Tensor, host: Params, dev: DevParams | None, bound: float = 1.0) -> torch.Tensor:
        return P.apply_where(x, host["on"], _gray)


@dataclass(frozen=True)
class Blur(Stage):
    """Gaussian blur with sigma ~ U[sigma], applied with probability ``p``.

    The PIL pipeline blurs with ``ImageFilter.GaussianBlur(radius=sigma)`` (PIL's box-blur
    approximation of a Gaussian), as the official code; the batched one with the exact Gaussian,
    its kernel covering 3 sigma of the view's largest sigma (``P.blur_radius``), edges repeated
    as PIL does.
    """

    p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    name: ClassVar[str] = "blur"
    draws: ClassVar[int] = 2

    def pil(self) -> Callable:
        return T.RandomApply([GaussianBlur(self.sigma)], p=self.p)

    def draw(self, u: np.ndarray, size: int) -> Params:
        """The coin and sigma; ``taps``: each sample's kernel (the identity where not blurred)."""
        on = _coin(u[:, 0], self.p)
        low, high = self.sigma
        sigma = np.where(on, low + u[:, 1] * (high - low), 0.0)
        return {"on": on, "sigma": sigma.astype(np.float32),
                "taps": P.gaussian_kernels(sigma, P.blur_radius(high, size))}

    def apply(self, x: torch.Tensor, host: Params, dev: DevParams | None, bound: float = 1.0) -> torch.Tensor:
        if dev is None:
            return P.apply_where(x, host["on"], P.blur, host["taps"])
        return P.apply_where(x, host["on"], P.blur, host["taps"], dev["taps"])


@dataclass(frozen=True)
class Solarize(Stage):
    p: float = 0.2
    name: ClassVar[str] = "solarize"

    def pil(self) -> Callable:
        return T.RandomApply([PILSolarize()], p=self.p)

    def apply(self, x: torch.Tensor, host: Params, dev: DevParams | None, bound: float = 1.0) -> torch.Tensor:
        return P.apply_where(x, host["on"], lambda y: P.solarize(y, 128 / 255 * bound, bound=bound))


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
    def draws(self) -> int:
        """Uniforms per sample: the crop's, then each stage's, in order."""
        return CROP_DRAWS + sum(stage.draws for stage in self.stages)

    def draw(self, u: np.ndarray, sizes: np.ndarray, geometric_only: bool = False,
             boxes: np.ndarray | None = None) -> ViewParams:
        """Every sample's parameters from its uniforms (N, ``draws``) and its image's (height,
        width) (N, 2): the crop's under "crop" (``boxes``, if given: ``crop_boxes`` of the first
        ``CROP_DRAWS`` columns), then each stage's (only the geometric ones' with
        ``geometric_only``). Each stage reads its own columns, so drawing a part draws the same."""
        boxes = self.crop_boxes(u[:, :CROP_DRAWS], sizes) if boxes is None else boxes
        params: ViewParams = {"crop": {"box": boxes}}
        column = CROP_DRAWS
        for stage in self.stages:
            if stage.geometric or not geometric_only:
                params[stage.name] = stage.draw(u[:, column:column + stage.draws], self.size)
            column += stage.draws
        return params

    def crop_boxes(self, u: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """(N, 4) boxes (top, left, height, width): ``T.RandomResizedCrop.get_params`` for every
        sample at once. Ten tries of an area ~ U[scale] of the image and a log-ratio ~ U[log
        ratio], the first that fits, at a uniform position; none fits: the central crop of the
        nearest allowed ratio. (Few numpy calls: the loader draws one sample at a time.)"""
        n, size = len(u), sizes.astype(np.float64)  # (height, width)
        low, high = self.scale
        area = np.sqrt(size.prod(1, keepdims=True) * (u[:, :_CROP_TRIES] * (high - low) + low))
        low, high = (math.log(r) / 2 for r in self.ratio)  # half the log-ratio: h = sqrt(area / r), w = sqrt(area * r)
        half_log_ratio = u[:, _CROP_TRIES:2 * _CROP_TRIES, None] * (high - low) + low
        hw = np.rint(area[..., None] * np.exp(half_log_ratio * _HEIGHT_WIDTH))  # (N, tries, 2): h, w
        fits = ((hw > 0) & (hw <= size[:, None])).all(-1)
        chosen = hw[np.arange(n), fits.argmax(1)]
        offsets = np.floor(u[:, 2 * _CROP_TRIES:] * (size - chosen + 1))
        missed = ~fits.any(1)
        if missed.any():
            height, width = size[missed].T
            in_ratio, low, high = width / height, min(self.ratio), max(self.ratio)
            chosen[missed] = np.stack([np.where(in_ratio < low, np.rint(width / low), height),
                                       np.where(in_ratio > high, np.rint(height * high), width)], 1)
            offsets[missed] = (size[missed] - chosen[missed]) // 2
        return np.concatenate([offsets, chosen], 1).astype(np.int64)

    def photometric(self, x: torch.Tensor, host: ViewParams, dev: dict[str, DevParams] | None,
                    bound: float = 1.0) -> torch.Tensor:
        """The non-geometric stages, in order, in place on a float chunk in [0, bound]."""
        for stage in self.stages:
            if not stage.geometric:
                x = stage.apply(x, host[stage.name], None if dev is None else dev.get(stage.name, {}), bound)
        return x
