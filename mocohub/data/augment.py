"""The papers' augmentation recipes, and the two-view wrapper MoCo trains on."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

__all__ = ["AUGMENTATIONS", "IMAGENET_MEAN", "IMAGENET_STD", "CIFAR_MEAN", "CIFAR_STD",
           "GaussianBlur", "TwoViews", "augmentation"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the official CIFAR demo's


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


def _moco_v1(size: int) -> list:
    return [T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomGrayscale(p=0.2),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip()]


def _moco_v2(size: int) -> list:
    return [T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
            T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5), T.RandomHorizontalFlip()]


def _cifar(size: int) -> list:
    return [T.RandomResizedCrop(size), T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]


# name -> (pipeline before ToTensor, default size, normalisation)
AUGMENTATIONS: dict[str, tuple[Callable[[int], list], int, tuple]] = {
    "moco-v1": (_moco_v1, 224, (IMAGENET_MEAN, IMAGENET_STD)),
    "moco-v2": (_moco_v2, 224, (IMAGENET_MEAN, IMAGENET_STD)),
    "cifar": (_cifar, 32, (CIFAR_MEAN, CIFAR_STD)),
}


def augmentation(name: str, size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> T.Compose:
    """One view of a recipe: ``moco-v1``, ``moco-v2`` ("aug+") or ``cifar``."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; valid: {', '.join(AUGMENTATIONS)}")
    build, default_size, (default_mean, default_std) = AUGMENTATIONS[name]
    return T.Compose([*build(size or default_size), T.ToTensor(),
                      T.Normalize(mean or default_mean, std or default_std)])


class TwoViews:
    """Two independently augmented views of one image: the query and the key."""

    def __init__(self, first: Callable, second: Callable | None = None):
        self.first, self.second = first, second or first

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.first(img), self.second(img)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(first={self.first}, second={self.second})"
