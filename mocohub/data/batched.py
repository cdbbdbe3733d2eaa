"""Batched two-view augmentation: per-sample crops in the loader, photometry on whole batches.

The loader worker does only what is per image: decode, and for an image larger than the output,
RandomResizedCrop + flip of both views on the uint8 image, their parameters drawn from the
sample's key (``keyed.py``). An image already of the output size (CIFAR at 32 px) is not even
cropped there: ``augment`` crops, resizes and flips all such images at once. ``augment`` draws
every parameter of the batch from the samples' keys in a few vectorised calls (the crop and flip
the loader drew are the same values), then runs the photometric stages (jitter in its random
order, grayscale, blur, solarize) and the normalisation vectorised over the batch, on the CPU or
on the training device.

On the CPU a view's batch is processed in chunks small enough for the temporaries to stay near
the L2 cache (one image at 224 px; at 32 px about 2 MB of images, sorted once by each stage's
``order_key``: the jitter's hue position, then grayscale, blur, solarize, and never mixing two
hue positions, so that each stage runs on the whole chunk or on a few runs of consecutive
samples), in place, in [0, 255] straight from the uint8 crops (the 1/255 folds into the
normalisation). On a GPU the whole batch is one chunk, and the view's per-sample factors reach
it in one pinned, non-blocking copy (``transfer.send``): no step waits on the host.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .augment import recipe, view_specs
from .convert import pil_to_uint8
from .keyed import new_key, uniforms
from .transfer import send, to_device
from .views import CROP_DRAWS, View, ViewParams

__all__ = ["BatchedTwoViews", "ViewCrops", "batched_resized_crop", "crop_plan", "resized_crop"]

CPU_CHUNK_BYTES = 2 << 20  # small images: chunks of about this many bytes of float images
SINGLE_IMAGE_BYTES = 256 << 10  # an image this large is a chunk by itself (its temporaries fill the L2 cache)
BOUND = 255.0


class ViewCrops(NamedTuple):
    """Both views of one image before photometry, or (after ``collate_images``) of a batch.

    ``crops``: uint8 (2, 3, S, S) per image, (N, 2, 3, S, S) per batch (query view first): the
    finished crops, or, for an image of the output size, the image itself in both slots (the batch
    crops all those at once); ``keys``: int64 () per image, (N,) per batch, what every parameter
    is drawn from (``BatchedTwoViews.draw``); ``sizes``: int64 (2,) per image, (N, 2) per batch,
    the source image's (height, width). All on the host.
    """

    crops: torch.Tensor
    keys: torch.Tensor
    sizes: torch.Tensor


def resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, source: int) -> torch.Tensor:
    """(n, size, source) matrices M with ``M @ column`` = the antialiased bilinear resize
    (``F.interpolate(..., antialias=True)``, align_corners False) of the ``length`` source pixels
    from ``start`` to ``size`` pixels: PyTorch's own triangle filter, its support widened by the
    scale when shrinking, normalised over the pixels inside the box."""
    start, length = start.float().view(-1, 1, 1), length.float().view(-1, 1, 1)
    scale = length / size
    inverse = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    local = torch.arange(source, dtype=torch.float32).view(1, 1, -1) - start  # index inside the box
    local = local.masked_fill((local < 0) | (local >= length), float("inf"))  # outside: weight 0
    center = scale * (torch.arange(size, dtype=torch.float32).view(1, -1, 1) + 0.5) - 0.5
    weights = torch.sub(local, center).mul_(inverse).abs_().neg_().add_(1).clamp_(min=0)
    return weights.div_(weights.sum(-1, keepdim=True))


def crop_plan(boxes: np.ndarray, flips: np.ndarray, size: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """What ``crop_batch`` needs to resize each box (top, left, height, width) of (height, width)
    images to ``size`` and flip it where ``flips`` says, built on the host: boxes no larger than
    ``size`` need no antialiasing, and the resize is bilinear interpolation at ``scale * (i +
    0.5) - 0.5`` clamped to the box (one ``grid_sample``: "grid"); larger ones are two matrix
    products of antialiased weights ("rows", "cols"), the flip folded into the column weights."""
    boxes, flips = torch.from_numpy(np.asarray(boxes, dtype=np.int64)), torch.from_numpy(np.asarray(flips, dtype=bool))
    if bool((boxes[:, 2:] <= size).all()):
        steps = torch.arange(size, dtype=torch.float32) + 0.5

        def coords(start: torch.Tensor, length: torch.Tensor, extent: int) -> torch.Tensor:
            start, length = start.float().view(-1, 1), length.float().view(-1, 1)
            pixel = torch.minimum((length / size * steps - 0.5).clamp_(min=0), length - 1) + start
            return (2 * pixel + 1) / extent - 1  # align_corners=False normalisation

        ys, xs = coords(boxes[:, 0], boxes[:, 2], height), coords(boxes[:, 1], boxes[:, 3], width)
        xs[flips] = xs[flips].flip(1)
        grid = torch.empty(len(boxes), size, size, 2)
        grid[..., 0] = xs.view(-1, 1, size)
        grid[..., 1] = ys.view(-1, size, 1)
        return {"grid": grid}
    rows = resize_weights(boxes[:, 0], boxes[:, 2], size, height)
    cols = resize_weights(boxes[:, 1], boxes[:, 3], size, width)
    cols[flips] = cols[flips].flip(1)
    return {"rows": rows, "cols": cols}


def crop_batch(images: torch.Tensor, plan: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """``images`` (uint8) cropped, resized and flipped by ``crop_plan``'s tensors (on their
    device), as float in the images' range, not rounded."""
    if "grid" in plan:
        return F.grid_sample(images.float(), plan["grid"], mode="bilinear", padding_mode="border",
                             align_corners=False)
    n, c, h, w = images.shape
    # one matrix per sample and pass: (C*H, W) @ (W, S), then (S, H) @ (H, C*S)
    wide = torch.bmm(images.float().view(n, c * h, w), plan["cols"].transpose(1, 2))
    tall = wide.view(n, c, h, size).transpose(1, 2).reshape(n, h, c * size)
    return torch.bmm(plan["rows"], tall).view(n, size, c, size).transpose(1, 2).contiguous()


def batched_resized_crop(images: torch.Tensor, boxes: np.ndarray | torch.Tensor, flips: Sequence[bool],
                         size: int) -> torch.Tensor:
    """Each image's box resized to ``size`` (antialiased bilinear, torchvision's ``resized_crop``)
    and flipped where ``flips`` says, as float, not rounded."""
    plan = crop_plan(np.asarray(boxes), np.asarray(flips, dtype=bool), size, *images.shape[-2:])
    return crop_batch(images, send(plan, images.device), size)


def _resize(box: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)`` (bilinear) on a
    uint8 (3, H, W) image, without its per-call dispatch (most of the cost at 32 px). A box
    already of the output size is only cut out (the resize would copy it unchanged)."""
    box = image[:, top:top + height, left:left + width]
    if height == size and width == size:
        return box
    # the uint8 kernel's fast path wants the box itself channels-last contiguous (not a window of a larger image)
    return _resize(box.unsqueeze(0).contiguous(memory_format=torch.channels_last), size)[0]


def _take(params: ViewParams, index: slice | np.ndarray) -> ViewParams:
    """The parameters of some samples (a slice, or host indices)."""
    return {name: {key: value[index] for key, value in stage.items()} for name, stage in params.items()}


def _flips(params: ViewParams) -> np.ndarray:
    return params["flip"]["on"] if "flip" in params else np.zeros(len(params["crop"]["box"]), dtype=bool)


class BatchedTwoViews:
    """A recipe's two views, split between the loader (``__call__``) and the batch (``augment``).

    As ``ImageFolder``'s transform (it accepts the cached uint8 tensors as well as PIL images, and
    takes each sample's key, from the run's seed, the epoch and the index: ``keyed = True``):
    a sample's views then depend on nothing else (not worker count, order, batch or a resume).
    Without a key, one is drawn from torch's generator. The parameters follow the distributions
    of ``two_views(recipe)``'s transforms (drawn otherwise: not the same values).
    ``collate_images`` collates the ``ViewCrops``.
    """

    accepts_tensors = True
    keyed = True

    def __init__(self, recipe_name: str, size: int | None = None, crop_min: float | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.views = view_specs(recipe_name, size, crop_min)
        self.size = self.views[0].size  # the views of a recipe share one size
        default_mean, default_std = recipe(recipe_name).normalize
        self.mean, self.std = tuple(mean or default_mean), tuple(std or default_std)
        self._columns, start = [], 0  # each view's columns of the uniforms
        for view in self.views:
            self._columns.append(slice(start, start + view.draws))
            start += view.draws
        self._normalize = {"shift": np.array(self.mean, dtype=np.float32).reshape(1, 3, 1, 1) * BOUND,
                           "scale": 1 / (np.array(self.std, dtype=np.float32).reshape(1, 3, 1, 1) * BOUND)}

    def draw(self, keys: np.ndarray | Sequence[int], sizes: np.ndarray, geometric_only: bool = False
             ) -> tuple[ViewParams, ...]:
        """Both views' parameters of the samples with these keys and source (height, width) sizes:
        one array of uniforms for all, each view reading its own columns."""
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        u = uniforms(np.asarray(keys, dtype=np.int64), self._columns[-1].stop)
        boxes, n = [None] * len(self.views), len(sizes)
        if len({(view.scale, view.ratio) for view in self.views}) == 1:  # the views crop alike: one call for all
            crop_u = np.concatenate([u[:, columns][:, :CROP_DRAWS] for columns in self._columns])
            every = self.views[0].crop_boxes(crop_u, np.concatenate([sizes] * len(self.views)))
            boxes = [every[i * n:(i + 1) * n] for i in range(len(self.views))]
        return tuple(view.draw(u[:, columns], sizes, geometric_only, part)
                     for view, columns, part in zip(self.views, self._columns, boxes))

    def __call__(self, image: Image.Image | torch.Tensor, key: int | None = None) -> ViewCrops:
        image = pil_to_uint8(image)
        key = new_key() if key is None else key
        height, width = image.shape[1:]
        sizes = torch.tensor([height, width])
        if height == width == self.size:  # crop and flip in the batch
            return ViewCrops(image.unsqueeze(0).expand(len(self.views), -1, -1, -1), torch.tensor(key), sizes)
        crops = np.empty((len(self.views), 3, self.size, self.size), dtype=np.uint8)
        for crop, params in zip(crops, self.draw([key], [height, width], geometric_only=True)):
            resized = resized_crop(image, *params["crop"]["box"][0].tolist(), self.size).numpy()
            # one numpy copy lays the (channels-last) crop out planar and flips it by a negative stride
            np.copyto(crop, resized[..., ::-1] if _flips(params)[0] else resized)
        return ViewCrops(torch.from_numpy(crops), torch.tensor(key), sizes)

    def augment(self, batch: ViewCrops, device: torch.device | str | None = None, *,
                channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key): float32 normalised (N, 3, S, S) batches on ``device`` (default: where the
        crops are). Moves the uint8 crops first, so on a GPU the photometry runs there; the
        parameters are drawn on the host and reach the device in one non-blocking copy per view."""
        crops = batch.crops.to(device, non_blocking=True) if device is not None else batch.crops
        n, _, c, h, w = crops.shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        sizes = batch.sizes.numpy()
        pending = (sizes == self.size).all(1)  # images of the output size: cropped and flipped here
        outs = []
        for i, (view, params) in enumerate(zip(self.views, self.draw(batch.keys.numpy(), sizes))):
            order, spans = self._plan(view, params, crops.device.type != "cpu", c * h * w * 4)
            view_crops, view_pending = crops[:, i], pending
            if order is not None:  # sorted once, so that every chunk is a slice
                params, view_pending = _take(params, order), pending[order]
                view_crops = view_crops.index_select(0, torch.from_numpy(order))
            plan = None
            if view_pending.any():
                boxes, flips = params["crop"]["box"][view_pending], _flips(params)[view_pending]
                plan = crop_plan(boxes, flips, self.size, h, w)
            dev = send({"params": params, "normalize": self._normalize, "crop": plan or {}}, crops.device)
            source = self._pending_crops(view_crops, view_pending, dev.get("crop", {}))
            shift, scale = dev["normalize"]["shift"], dev["normalize"]["scale"]
            fill = order is None and not source.is_floating_point()  # each chunk converted into its place, then processed
            out = torch.empty(n, c, h, w, device=crops.device) if fill else source.float()  # sorted: one float copy
            for start, stop in spans:
                x = out[start:stop].copy_(source[start:stop]) if fill else out[start:stop]
                single = stop - start == 1 and x.device.type == "cpu"  # plain floats: no device parameters
                chunk_dev = None if single else _take(dev["params"], slice(start, stop))
                view.photometric(x, _take(params, slice(start, stop)), chunk_dev, BOUND).sub_(shift).mul_(scale)
            if order is not None:
                out = out.index_select(0, torch.from_numpy(np.argsort(order)))
            outs.append(out.contiguous(memory_format=fmt))
        return outs[0], outs[1]

    def _pending_crops(self, crops: torch.Tensor, pending: np.ndarray, plan: dict[str, torch.Tensor]) -> torch.Tensor:
        """The view's crops: as they came (uint8), or, where the loader left the crop to the
        batch, all those cropped, resized and flipped at once (float; the rest converted)."""
        if not pending.any():
            return crops
        if pending.all():
            return crop_batch(crops, plan, self.size)
        picked = to_device(torch.from_numpy(np.flatnonzero(pending)), crops.device)
        done = crops.float()
        done[picked] = crop_batch(crops.index_select(0, picked), plan, self.size)
        return done

    @staticmethod
    def _plan(view: View, params: ViewParams, whole: bool, image_bytes: int) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
        """The order to process a view's samples in (None: as they are) and its chunks, as
        [start, stop) spans of that order: the whole batch on a GPU; on the CPU, one image per
        chunk for large images, else samples sorted by each photometric stage's ``order_key`` in
        turn (each stage then runs on few runs of consecutive samples), in chunks of at most
        ``CPU_CHUNK_BYTES`` that never mix a stage's ``groups``."""
        n = len(params["crop"]["box"])
        if whole:
            return None, [(0, n)]
        if image_bytes >= SINGLE_IMAGE_BYTES:
            return None, [(j, j + 1) for j in range(n)]
        stages = [stage for stage in view.stages if not stage.geometric]
        keys = [stage.order_key(params[stage.name]) for stage in stages]
        order = np.lexsort(keys[::-1]) if keys else np.arange(n)
        labels = [g[order] for g in (stage.groups(params[stage.name]) for stage in stages) if g is not None]
        cuts = {0, n}
        for label in labels:  # a chunk never mixes two labels
            cuts.update((np.flatnonzero(label[1:] != label[:-1]) + 1).tolist())
        bounds, limit = sorted(cuts), max(1, CPU_CHUNK_BYTES // image_bytes)
        return order, [(s, min(s + limit, stop)) for start, stop in zip(bounds[:-1], bounds[1:])
                       for s in range(start, stop, limit)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(views={self.views}, mean={self.mean}, std={self.std})"
