"""Batched two-view augmentation: per-sample crops in the loader, photometry on whole batches.

The loader worker does only what is per image: decode, draw every parameter of both views from
the per-sample seeded generator (computed from one read of its state, ``draws.py``),
RandomResizedCrop + flip on the uint8 image. An image already of the output size (CIFAR at
32 px) is not even cropped there: its boxes travel with it and ``augment`` crops, resizes and
flips all such images at once. The photometric stages (jitter in its random order, grayscale,
blur, solarize) and normalisation then run vectorised over the collated batch, on the CPU or
on the training device.

On the CPU a view's batch is processed in chunks small enough for the temporaries to stay near
the L2 cache (one image at 224 px; at 32 px about 2 MB of images, sorted once by where their
order puts the hue rotation, then grayscale, blur, solarize, and never mixing two hue
positions, so that each stage runs on the whole chunk or on a few runs of consecutive samples),
in place, in [0, 255] straight from the uint8 crops (the 1/255 folds into the normalisation).
On a GPU the whole batch is one chunk.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .augment import recipe, view_specs
from .convert import pil_to_uint8
from .draws import Words, fast_draws_available
from .views import NUM_PARAMS, SLOTS, Params, pack, unpack

__all__ = ["BatchedTwoViews", "ViewCrops", "resized_crop"]

CPU_CHUNK_BYTES = 2 << 20  # small images: chunks of about this many bytes of float images
SINGLE_IMAGE_BYTES = 256 << 10  # an image this large is a chunk by itself (its temporaries fill the L2 cache)
BOUND = 255.0


class ViewCrops(NamedTuple):
    """Both views of one image before photometry, or (after ``collate_images``) of a batch.

    ``crops``: uint8 (2, 3, S, S) per image, (N, 2, 3, S, S) per batch (query view first);
    ``params``: both views' parameter rows, float (2, NUM_PARAMS) per image, (N, 2, NUM_PARAMS)
    per batch (``views.SLOTS`` names the columns; ``view_params`` gives them by name);
    ``boxes``: float (2, 5) per image, (N, 2, 5) per batch (whole numbers): (pending, top, left,
    height, width),
    each view's crop box; ``pending`` 1 where the loader left the crop and flip to ``augment``
    (an image already of the output size is shipped as it is, in both slots: the batch stage
    crops and resizes all such images at once), 0 where ``crops`` holds the finished crop.
    """

    crops: torch.Tensor
    params: torch.Tensor
    boxes: torch.Tensor

    def view_params(self, view: int) -> Params:
        """View ``view``'s parameters by name (``views.unpack``), with the batch axis if any."""
        return unpack(self.params[..., view, :])


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


def batched_resized_crop(images: torch.Tensor, boxes: torch.Tensor, flips: Sequence[bool], size: int) -> torch.Tensor:
    """Each image's box (top, left, height, width) resized to ``size`` (antialiased bilinear,
    torchvision's ``resized_crop``) and flipped where ``flips`` says, as float in the images'
    range, not rounded: two batched matrix products, the flip folded into the column weights."""
    boxes = boxes.to("cpu", torch.int64)
    if bool((boxes[:, 2:] <= size).all()):
        return _upsampled_crop(images, boxes, flips, size)
    rows = resize_weights(boxes[:, 0], boxes[:, 2], size, images.shape[-2])
    cols = resize_weights(boxes[:, 1], boxes[:, 3], size, images.shape[-1])
    flip = torch.tensor(list(flips), dtype=torch.bool)
    if bool(flip.any()):
        cols[flip] = cols[flip].flip(1)
    rows, cols = rows.to(images.device), cols.to(images.device)
    n, c, h, w = images.shape
    # one matrix per sample and pass: (C*H, W) @ (W, S), then (S, H) @ (H, C*S)
    wide = torch.bmm(images.float().view(n, c * h, w), cols.transpose(1, 2))
    tall = wide.view(n, c, h, size).transpose(1, 2).reshape(n, h, c * size)
    return torch.bmm(rows, tall).view(n, size, c, size).transpose(1, 2).contiguous()


def _upsampled_crop(images: torch.Tensor, boxes: torch.Tensor, flips: Sequence[bool], size: int) -> torch.Tensor:
    """``batched_resized_crop`` of boxes no larger than ``size``: antialiasing then changes
    nothing, and the resize is bilinear interpolation at ``scale * (i + 0.5) - 0.5`` clamped to
    the box (the filter's weights renormalised inside it), one ``grid_sample`` for the batch."""
    n, _, h, w = images.shape
    steps = torch.arange(size, dtype=torch.float32) + 0.5

    def coords(start: torch.Tensor, length: torch.Tensor, extent: int) -> torch.Tensor:
        start, length = start.float().view(-1, 1), length.float().view(-1, 1)
        pixel = torch.minimum((length / size * steps - 0.5).clamp_(min=0), length - 1) + start
        return (2 * pixel + 1) / extent - 1  # align_corners=False normalisation

    ys, xs = coords(boxes[:, 0], boxes[:, 2], h), coords(boxes[:, 1], boxes[:, 3], w)
    flip = torch.tensor(list(flips), dtype=torch.bool)
    xs[flip] = xs[flip].flip(1)
    grid = torch.empty(n, size, size, 2)
    grid[..., 0] = xs.view(n, 1, size)
    grid[..., 1] = ys.view(n, size, 1)
    return F.grid_sample(images.float(), grid.to(images.device), mode="bilinear", padding_mode="border",
                         align_corners=False)


def _interpolate(box: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _direct_resize():
    """``F.interpolate``'s antialiased bilinear kernel without its Python argument handling (half
    the cost of a 32 px crop), if this torch has it under the name we know and it agrees."""
    op = getattr(torch._C._nn, "_upsample_bilinear2d_aa", None)
    if op is None:
        return _interpolate
    try:
        probe = torch.arange(3 * 7 * 9, dtype=torch.uint8).view(1, 3, 7, 9)
        if torch.equal(op(probe, [5, 5], False), _interpolate(probe, 5)):
            return lambda box, size: op(box, [size, size], False)
    except (RuntimeError, TypeError):
        pass
    return _interpolate


_resize = _direct_resize()


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)`` (bilinear) on a
    uint8 (3, H, W) image, without its per-call dispatch (most of the cost at 32 px). A box
    already of the output size is only cut out (the resize would copy it unchanged)."""
    box = image[:, top:top + height, left:left + width]
    if height == size and width == size:
        return box
    # the uint8 kernel's fast path wants the box itself channels-last contiguous (not a window of a larger image)
    return _resize(box.unsqueeze(0).contiguous(memory_format=torch.channels_last), size)[0]


def _tensor(rows: list[list[float]]) -> torch.Tensor:
    """A float32 tensor of nested lists, through numpy (four times faster than torch.tensor)."""
    return torch.from_numpy(np.array(rows, dtype=np.float32))


def _hue_position(row: list, first: int) -> int:
    """Where this sample's jitter order puts the hue rotation (4: no jitter)."""
    if row[SLOTS["jitter"]] < 0.5:
        return 4
    return [int(op) for op in row[first:first + 4]].index(3)


class BatchedTwoViews:
    """A recipe's two views, split between the loader (``__call__``) and the batch (``augment``).

    As ``ImageFolder``'s transform (it accepts the cached uint8 tensors as well as PIL images):
    each call draws both views' parameters, in the PIL pipeline's order, from torch's global
    generator, which a seeded ``ImageFolder`` seeds per (seed, epoch, index): a sample's views
    then depend on nothing else (not worker count, order, or a resume), and are the very
    parameters ``two_views(recipe)`` would draw. The draws are computed from one read of the
    generator (``draws.Words``) where that reproduces torch's calls, by the calls otherwise.
    ``collate_images`` collates the ``ViewCrops``.
    """

    accepts_tensors = True

    def __init__(self, recipe_name: str, size: int | None = None, crop_min: float | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.views = view_specs(recipe_name, size, crop_min)
        default_mean, default_std = recipe(recipe_name).normalize
        self.mean, self.std = tuple(mean or default_mean), tuple(std or default_std)
        self.max_words = sum(view.max_words for view in self.views)
        self.fast_draws: bool | None = None  # decided at the first call (in the loader process)

    def draw(self, height: int, width: int) -> tuple[list[tuple[int, int, int, int]], torch.Tensor]:
        """Both views' crop boxes and parameter rows (2, NUM_PARAMS), drawn from torch's generator."""
        boxes, rows = self._draw(height, width)
        return boxes, _tensor(rows)

    def _draw(self, height: int, width: int) -> tuple[list[tuple[int, int, int, int]], list[list[float]]]:
        if self.fast_draws is None:
            self.fast_draws = fast_draws_available()
        if self.fast_draws:
            words = Words(self.max_words)
            drawn = [view.draw(words, height, width) for view in self.views]
            words.commit()
            return [box for box, _ in drawn], [row for _, row in drawn]
        image = torch.empty(0, height, width)  # get_params reads only the size
        drawn = [view.sample(image) for view in self.views]
        return [box for box, _ in drawn], [pack(params).tolist() for _, params in drawn]

    def __call__(self, image: Image.Image | torch.Tensor) -> ViewCrops:
        image = pil_to_uint8(image)
        boxes, rows = self._draw(image.shape[1], image.shape[2])
        sizes = {view.size for view in self.views}
        pending = sizes == {image.shape[1]} and image.shape[1] == image.shape[2]  # crop and flip in the batch
        both = _tensor([row + [float(pending), *box] for row, box in zip(rows, boxes)])
        if pending:
            return ViewCrops(image.unsqueeze(0).expand(2, -1, -1, -1), both[:, :NUM_PARAMS], both[:, NUM_PARAMS:])
        flip, size = SLOTS["flip"], self.views[0].size  # the views of a recipe share one size
        crops = np.empty((len(self.views), 3, size, size), dtype=np.uint8)
        for crop, box, row in zip(crops, boxes, rows):
            resized = resized_crop(image, *box, size).numpy()
            # one numpy copy lays the (channels-last) crop out planar and flips it by a negative stride
            np.copyto(crop, resized[..., ::-1] if row[flip] > 0.5 else resized)
        return ViewCrops(torch.from_numpy(crops), both[:, :NUM_PARAMS], both[:, NUM_PARAMS:])

    def augment(self, batch: ViewCrops, device: torch.device | str | None = None, *,
                channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key): float32 normalised (N, 3, S, S) batches on ``device`` (default: where the
        crops are). Moves the uint8 crops first, so on a GPU the photometry runs there."""
        crops = batch.crops.to(device, non_blocking=True) if device is not None else batch.crops
        n, _, c, h, w = crops.shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        params = batch.params.detach().to("cpu", torch.float32)
        boxes = batch.boxes.detach().to("cpu", torch.int64)
        scale = torch.tensor([1 / (BOUND * s) for s in self.std], device=crops.device).view(1, 3, 1, 1)
        shift = torch.tensor([m * BOUND for m in self.mean], device=crops.device).view(1, 3, 1, 1)
        outs = []
        for i, view in enumerate(self.views):
            rows = params[:, i].tolist()
            order, spans = self._plan(rows, crops.is_cuda, c * h * w * 4)
            view_crops, view_boxes = crops[:, i], boxes[:, i]
            if order is not None:  # sorted once, so that every chunk is a slice
                rows = [rows[j] for j in order]
                perm = torch.tensor(order)
                view_crops, view_boxes = view_crops.index_select(0, perm.to(crops.device)), view_boxes[perm]
            flips = [row[SLOTS["flip"]] > 0.5 for row in rows]
            source = self._pending_crops(view_crops, view_boxes, flips, view.size)
            if order is None:  # each chunk converted into its place in the output, then processed there in place
                out = source if source.is_floating_point() else torch.empty(n, c, h, w, device=crops.device)
                for start, stop in spans:
                    x = out[start:stop] if out is source else out[start:stop].copy_(source[start:stop])
                    view.photometric(x, rows[start:stop], BOUND).sub_(shift).mul_(scale)
            else:  # all in place in one float copy of the sorted crops, then put back in order
                source = source.float()
                for start, stop in spans:
                    view.photometric(source[start:stop], rows[start:stop], BOUND).sub_(shift).mul_(scale)
                out = source.index_select(0, torch.argsort(perm).to(crops.device))
            outs.append(out.contiguous(memory_format=fmt))
        return outs[0], outs[1]

    @staticmethod
    def _pending_crops(crops: torch.Tensor, boxes: torch.Tensor, flips: list[bool], size: int) -> torch.Tensor:
        """The view's crops: as they came (uint8), or, where the loader left the crop to the
        batch, all those cropped, resized and flipped at once (float; the rest converted)."""
        pending = boxes[:, 0] > 0
        if not bool(pending.any()):
            return crops
        if bool(pending.all()):
            return batched_resized_crop(crops, boxes[:, 1:], flips, size)
        idx = pending.nonzero().squeeze(1)
        done = crops.float()
        picked = idx.to(crops.device)
        done[picked] = batched_resized_crop(crops[picked], boxes[idx, 1:], [flips[j] for j in idx.tolist()], size)
        return done

    @staticmethod
    def _plan(rows: list[list[float]], whole: bool, image_bytes: int) -> tuple[list[int] | None, list[tuple[int, int]]]:
        """The order to process a view's samples in (None: as they are) and its chunks, as
        [start, stop) spans of that order: the whole batch on a GPU; on the CPU, one image per
        chunk for large images, else samples sorted by hue position, then grayscale, blur and
        solarize (each stage then runs on few runs of consecutive samples), in chunks of at most
        ``CPU_CHUNK_BYTES`` that never mix two hue positions."""
        n = len(rows)
        if whole:
            return None, [(0, n)]
        if image_bytes >= SINGLE_IMAGE_BYTES:
            return None, [(j, j + 1) for j in range(n)]
        first = SLOTS["jitter_order"].start
        gray, sigma, sol = SLOTS["gray"], SLOTS["blur_sigma"], SLOTS["solarize"]
        keys = [(_hue_position(row, first), row[gray], row[sigma] > 0, row[sol]) for row in rows]
        order = sorted(range(n), key=keys.__getitem__)
        limit = max(1, CPU_CHUNK_BYTES // image_bytes)
        spans, start = [], 0
        for stop in range(1, n + 1):  # a chunk never mixes hue positions: the others' blends then skip it
            if stop == n or stop - start == limit or keys[order[stop]][0] != keys[order[start]][0]:
                spans.append((start, stop))
                start = stop
        return order, spans

    def __repr__(self) -> str:
        return f"{type(self).__name__}(views={self.views}, mean={self.mean}, std={self.std})"
