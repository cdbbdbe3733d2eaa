"""Batched two-view augmentation: per-sample crops in the loader, photometry on whole batches.

The loader worker does only what is per image: decode, draw every parameter of both views from
the per-sample seeded generator, RandomResizedCrop + flip on the uint8 image. The photometric
stages (jitter in its random order, grayscale, blur, solarize) and normalisation then run
vectorised over the collated batch, on the CPU or on the training device.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .augment import recipe, view_specs
from .convert import pil_to_uint8
from .views import Params

__all__ = ["BatchedTwoViews", "ViewCrops", "resized_crop"]

CPU_CHUNK_BYTES = 1 << 20  # a chunk of float images this large keeps every temporary in L2


class ViewCrops(NamedTuple):
    """Both views of one image before photometry, or (after ``collate_images``) of a batch.

    ``crops``: uint8 (2, 3, S, S) per image, (N, 2, 3, S, S) per batch (query view first);
    ``params``: each view's photometric parameters, name -> tensor with a leading batch axis.
    """

    crops: torch.Tensor
    params: Sequence[Params]


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)`` (bilinear) on a
    uint8 (3, H, W) image, without its per-call dispatch (a third of the cost at 32 px)."""
    box = image[:, top:top + height, left:left + width].unsqueeze(0)
    return F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


class BatchedTwoViews:
    """A recipe's two views, split between the loader (``__call__``) and the batch (``augment``).

    As ``ImageFolder``'s transform (it accepts the cached uint8 tensors as well as PIL images):
    each call draws both views' parameters, in the PIL pipeline's order, from torch's global
    generator, which a seeded ``ImageFolder`` seeds per (seed, epoch, index): a sample's views
    then depend on nothing else (not worker count, order, or a resume), and are the very
    parameters ``two_views(recipe)`` would draw. ``collate_images`` collates the ``ViewCrops``.
    """

    accepts_tensors = True

    def __init__(self, recipe_name: str, size: int | None = None, crop_min: float | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.views = view_specs(recipe_name, size, crop_min)
        default_mean, default_std = recipe(recipe_name).normalize
        self.mean, self.std = tuple(mean or default_mean), tuple(std or default_std)

    def __call__(self, image: Image.Image | torch.Tensor) -> ViewCrops:
        image = pil_to_uint8(image)
        crops, params = [], []
        for view in self.views:
            box, drawn = view.sample(image)
            crop = resized_crop(image, *box, view.size)
            crops.append(crop.flip(-1) if drawn.get("flip", False) else crop)
            params.append(drawn)
        return ViewCrops(torch.stack(crops), tuple(params))

    def augment(self, batch: ViewCrops, device: torch.device | str | None = None, *,
                channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key): float32 normalised (N, 3, S, S) batches on ``device`` (default: where the
        crops are). Moves the uint8 crops first, so on a GPU the photometry runs there."""
        crops = batch.crops.to(device, non_blocking=True) if device is not None else batch.crops
        n, _, c, h, w = crops.shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        mean = torch.tensor(self.mean, device=crops.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=crops.device).view(1, 3, 1, 1)
        step = n if crops.is_cuda else max(1, CPU_CHUNK_BYTES // (c * h * w * 4))
        out = [torch.empty(n, c, h, w, device=crops.device).contiguous(memory_format=fmt) for _ in self.views]
        for start in range(0, n, step):  # on the CPU, chunks whose temporaries stay in cache
            part = slice(start, start + step)
            for i, view in enumerate(self.views):
                x = view.photometric(crops[part, i].float().div_(255), {k: v[part] for k, v in batch.params[i].items()})
                out[i][part] = (x - mean) / std
        return out[0], out[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(views={self.views}, mean={self.mean}, std={self.std})"
