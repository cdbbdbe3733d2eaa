"""The papers' augmentation recipes, and the two-view wrapper MoCo trains on."""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from .norms import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from .views import Blur, ColorJitter, Flip, GaussianBlur, Grayscale, Solarize, View

__all__ = ["AUGMENTATIONS", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR_MEAN", "CIFAR_STD", "Augmentation",
           "GaussianBlur", "TwoViews", "augmentation", "recipe", "two_views", "view_specs"]


class Augmentation(NamedTuple):
    """A recipe: ``views(size, crop_min)`` gives its (query, key) views, in the official order."""

    views: Callable[[int, float], tuple[View, View]]
    size: int
    normalize: tuple[Sequence[float], Sequence[float]]
    crop_min: float


def _moco_v1(size: int, crop_min: float) -> tuple[View, View]:
    view = View(size, (crop_min, 1.0), (Grayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), Flip()))
    return view, view


def _moco_v2(size: int, crop_min: float) -> tuple[View, View]:
    view = View(size, (crop_min, 1.0), (ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), Grayscale(0.2),
                                        Blur(0.5, (0.1, 2.0)), Flip()))
    return view, view


def _moco_v3(size: int, crop_min: float) -> tuple[View, View]:
    """Two different views: always blurred, or rarely blurred and sometimes solarized."""
    jitter, gray = ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), Grayscale(0.2)
    return (View(size, (crop_min, 1.0), (jitter, gray, Blur(1.0, (0.1, 2.0)), Flip())),
            View(size, (crop_min, 1.0), (jitter, gray, Blur(0.1, (0.1, 2.0)), Solarize(0.2), Flip())))


def _cifar(size: int, crop_min: float) -> tuple[View, View]:
    view = View(size, (crop_min, 1.0), (Flip(), ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), Grayscale(0.2)))
    return view, view


AUGMENTATIONS: dict[str, Augmentation] = {
    "moco-v1": Augmentation(_moco_v1, 224, (IMAGENET_MEAN, IMAGENET_STD), 0.2),
    "moco-v2": Augmentation(_moco_v2, 224, (IMAGENET_MEAN, IMAGENET_STD), 0.2),
    "moco-v3": Augmentation(_moco_v3, 224, (IMAGENET_MEAN, IMAGENET_STD), 0.08),  # the released models: 0.2
    "cifar": Augmentation(_cifar, 32, (CIFAR_MEAN, CIFAR_STD), 0.08),
}


def recipe(name: str) -> Augmentation:
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; valid: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]


def view_specs(name: str, size: int | None = None, crop_min: float | None = None) -> tuple[View, View]:
    """The recipe's two views (equal for all but ``moco-v3``); ``crop_min`` is RRC's lower scale."""
    aug = recipe(name)
    return aug.views(size or aug.size, aug.crop_min if crop_min is None else crop_min)


def _pil_view(view: View, normalize: tuple) -> T.Compose:
    return T.Compose([*view.pil(), T.ToTensor(), T.Normalize(*normalize)])


def augmentation(name: str, size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, *, crop_min: float | None = None) -> T.Compose:
    """One view of a single-view recipe: ``moco-v1``, ``moco-v2`` ("aug+") or ``cifar``."""
    first, second = view_specs(name, size, crop_min)
    if first != second:
        raise ValueError(f"{name!r} has two different views: use two_views({name!r})")
    default_mean, default_std = recipe(name).normalize
    return _pil_view(first, (mean or default_mean, std or default_std))


def two_views(name: str, size: int | None = None, *, crop_min: float | None = None,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> TwoViews:
    """The PIL pipelines of a recipe's query and key views (any recipe, ``moco-v3`` included)."""
    default_mean, default_std = recipe(name).normalize
    normalize = (mean or default_mean, std or default_std)
    return TwoViews(*(_pil_view(view, normalize) for view in view_specs(name, size, crop_min)))


class TwoViews:
    """Two independently augmented views of one image: the query and the key."""

    def __init__(self, first: Callable, second: Callable | None = None):
        self.first, self.second = first, second or first

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.first(img), self.second(img)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(first={self.first}, second={self.second})"
