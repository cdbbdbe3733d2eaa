"""One view of an augmentation recipe, described once and run two ways.

A ``View`` is the official pipeline's steps in the official order: a RandomResizedCrop then
stages (flip, colour jitter, grayscale, blur, solarize). Each stage builds its PIL transform
(``pil``), draws its parameters from torch's global generator exactly as that torchvision
transform does, in the same order and with the same conditional draws (``sample``), and applies
itself to a whole float batch given those parameters (``apply``). So for the same seed the batched
pipeline uses the very parameters the PIL pipeline would have drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from . import photometric as P

__all__ = ["Blur", "ColorJitter", "Flip", "GaussianBlur", "Grayscale", "Solarize", "Stage", "View",
           "blur_kernel_size"]

Params = dict[str, torch.Tensor]


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
    """One random step after the crop. ``geometric`` stages run per sample in the loader worker."""

    geometric: ClassVar[bool] = False

    def pil(self) -> Callable:
        raise NotImplementedError

    def sample(self) -> Params:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Flip(Stage):
    p: float = 0.5
    geometric: ClassVar[bool] = True

    def pil(self) -> Callable:
        return T.RandomHorizontalFlip(self.p)

    def sample(self) -> Params:
        return {"flip": torch.tensor(_rand() < self.p)}


@dataclass(frozen=True)
class ColorJitter(Stage):
    """ColorJitter(brightness, contrast, saturation, hue), applied with probability ``p``
    (``None``: always, without drawing a coin, as a bare ``T.ColorJitter`` does)."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    p: float | None = None
    OPS: ClassVar[tuple] = (P.adjust_brightness, P.adjust_contrast, P.adjust_saturation, P.adjust_hue)
    NEUTRAL: ClassVar[tuple] = (1.0, 1.0, 1.0, 0.0)

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

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """At each of the 4 positions, each op runs on the samples whose order puts it there."""
        on, order, factors = params["jitter"], params["jitter_order"], params["jitter_factors"]
        enabled = [bounds is not None for bounds in self._ranges()]
        for position in range(4):
            for op_id, op in enumerate(self.OPS):
                if enabled[op_id]:
                    x = P.apply_where(x, on & (order[:, position] == op_id), op, factors[:, op_id])
        return x


@dataclass(frozen=True)
class Grayscale(Stage):
    p: float = 0.2

    def pil(self) -> Callable:
        return T.RandomGrayscale(self.p)

    def sample(self) -> Params:
        return {"gray": torch.tensor(_rand() < self.p)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return P.apply_where(x, params["gray"], lambda y: P.grayscale(y).expand_as(y))


@dataclass(frozen=True)
class Blur(Stage):
    """Gaussian blur with sigma ~ U[sigma], applied with probability ``p``.

    The PIL pipeline blurs with ``ImageFilter.GaussianBlur(radius=sigma)`` (PIL's box-blur
    approximation), as the official code; the batched one with an exact Gaussian of
    ``blur_kernel_size(image size)`` taps (23 at 224 px), as torchvision's ``GaussianBlur``.
    """

    p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)

    def pil(self) -> Callable:
        return T.RandomApply([GaussianBlur(self.sigma)], p=self.p)

    def sample(self) -> Params:
        sigma = torch.empty(1).uniform_(*self.sigma).item() if _applied(self.p) else 0.0
        return {"blur_sigma": torch.tensor(sigma)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        sigma = params["blur_sigma"]
        return P.apply_where(x, sigma > 0, lambda y, s: P.gaussian_blur(y, s, blur_kernel_size(x.shape[-1])),
                             sigma)


@dataclass(frozen=True)
class Solarize(Stage):
    p: float = 0.2

    def pil(self) -> Callable:
        return T.RandomApply([PILSolarize()], p=self.p)

    def sample(self) -> Params:
        return {"solarize": torch.tensor(_applied(self.p))}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return P.apply_where(x, params["solarize"], P.solarize)


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

    def sample(self, image: torch.Tensor) -> tuple[tuple[int, int, int, int], Params]:
        """The crop box (top, left, height, width) by ``T.RandomResizedCrop.get_params`` itself,
        then every stage's parameters, in the PIL pipeline's order of draws."""
        box = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        params: Params = {}
        for stage in self.stages:
            params.update(stage.sample())
        return box, params

    def photometric(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """The non-geometric stages on a float batch, in order."""
        for stage in self.stages:
            if not stage.geometric:
                x = stage.apply(x, params)
        return x
