"""Any folder of images as a dataset: nested, mixed formats and modes, corrupt files survived."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ..errors import MocohubError
from .cache import CACHE_CHOICES, ImageCache, open_cache
from .convert import DECODE_ERRORS, load_rgb, uint8_to_pil
from .defaults import DEFAULT_WORKERS
from .samples import Names, Samples, list_images

__all__ = ["IMAGE_EXTENSIONS", "DEFAULT_WORKERS", "ImageFolder", "Batch", "collate_images", "load_rgb", "sample_seed",
           "check_options"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
MAX_SUBSTITUTES = 16


class Batch(NamedTuple):
    """A collated batch; ``failed`` names the files that could not be decoded for it."""

    images: Any
    labels: torch.Tensor
    indices: torch.Tensor
    failed: list[str]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentations in ``epoch`` (the same in every process)."""
    return hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF


def check_options(on_error: str, cache_images: str) -> None:
    """The options every image source takes (a folder, ``shards.ShardImages``)."""
    if on_error not in ("substitute", "skip"):
        raise ValueError(f"on_error must be 'substitute' or 'skip', not {on_error!r}")
    if cache_images not in CACHE_CHOICES:
        raise ValueError(f"cache_images must be one of {', '.join(CACHE_CHOICES)}, not {cache_images!r}")


class ImageFolder(Dataset):
    """Images found recursively under ``root``; class labels from first-level sub-folders.

    Labels exist when every image sits in a first-level sub-folder (the ImageNet layout);
    otherwise every label is -1. Files with other extensions are listed in ``skipped``.
    With ``on_error="substitute"`` (training) an undecodable image is replaced by the next
    good one so batches keep their size; with ``"skip"`` (evaluation) it is dropped.
    With a ``seed``, the random transform of sample i in epoch e is keyed by ``sample_seed(seed, e,
    i)``: a transform with ``keyed = True`` (``BatchedTwoViews``) gets it as ``key``, others draw
    from torch's CPU generator seeded by it (and restored after): augmentations then do not depend
    on worker count, order or a resume. The CUDA generators are left alone (torch.manual_seed
    would reseed them at every sample, e.g. the Shuffle-BN permutation's with workers=0).

    ``cache_images``: "on" decodes every image once, here, into one shared-memory buffer that
    loader workers read without copies (a ``MocohubError`` if the decoded images exceed
    ``cache_budget`` bytes, default: the free space of /dev/shm and a quarter of the available
    memory, shared among the node's processes (LOCAL_WORLD_SIZE), at most 2 GiB); "auto" does so
    when an estimate from a sample of headers fits the budget, and streams from disk otherwise;
    "off" always streams. ``cache_barrier`` (entered by every process of the job): one copy per
    node, decoded by its local rank 0 (``cache.open_cache``). ``cache_note`` says in one line what
    was chosen and why. Transforms with ``accepts_tensors = True`` then get the cached (3, H, W)
    uint8 tensors, others PIL images as usual.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, *,
                 on_error: str = "substitute", extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 seed: int | None = None, cache_images: str = "off", cache_budget: int | None = None,
                 cache_barrier: Callable[[], None] | None = None):
        check_options(on_error, cache_images)
        self.root = Path(root)
        if not self.root.is_dir():
            raise MocohubError(f"image folder {self.root} does not exist or is not a folder")
        self.transform = transform
        self.on_error = on_error
        self.seed, self.epoch = seed, 0
        root_dir = str(self.root)
        images, groups, self.skipped = list_images(root_dir, extensions)
        if not images:
            raise MocohubError(f"no images found under {self.root} (looked for {', '.join(extensions)})")
        labelled = all(top for top, _ in groups)  # every image inside a first-level folder
        self.classes = sorted({top for top, _ in groups}) if labelled else []
        index = {c: i for i, c in enumerate(self.classes)}
        labels = np.repeat([index[top] if labelled else -1 for top, _ in groups], [n for _, n in groups])
        self._samples = Samples(Names(images, os.path.join(root_dir, "")), labels)
        del images  # the flat copy is all that stays (before the cache is decoded)
        if self.skipped:
            warnings.warn(f"{len(self.skipped)} non-image file(s) under {self.root} ignored, "
                          f"e.g. {self.skipped[0]}", stacklevel=2)
        self.cache: ImageCache | None
        self.cache, self.cache_note = open_cache(self._samples.paths, cache_images, cache_budget,
                                                 barrier=cache_barrier)

    @property
    def samples(self) -> Samples:
        """``(path, label)`` per image, held in flat arrays (``Samples``): loader workers reading it
        do not copy it."""
        return self._samples

    @samples.setter
    def samples(self, pairs: Iterable[tuple[str, int]]) -> None:
        """Set from ``(path, label)`` pairs (a subclass's own listing), stored flat as well."""
        self._samples = Samples.from_pairs(pairs, os.path.join(str(self.root), ""))

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def targets(self) -> list[int]:
        return self._samples.labels.tolist()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentations (takes effect in DataLoader iterators made after it)."""
        self.epoch = epoch

    def _image(self, index: int) -> Image.Image | torch.Tensor:
        if self.cache is None:
            return load_rgb(self._samples.paths[index])
        image = self.cache[index]
        return image if getattr(self.transform, "accepts_tensors", False) else uint8_to_pil(image)

    def _load(self, index: int):
        image, label = self._image(index), int(self._samples.labels[index])
        if self.transform is None:
            return image, label
        if self.seed is None:
            return self.transform(image), label
        key = sample_seed(self.seed, self.epoch, index)
        if getattr(self.transform, "keyed", False):
            return self.transform(image, key=key), label
        with torch.random.fork_rng(devices=()):  # restores the CPU generator only: seed only it
            torch.random.default_generator.manual_seed(key)
            return self.transform(image), label

    def __getitem__(self, index: int):
        """Return ``(image, label, index, failed_paths)``; image is None when skipped."""
        failed = []
        for attempt in range(MAX_SUBSTITUTES if self.on_error == "substitute" else 1):
            i = (index + attempt) % len(self._samples)
            try:
                image, label = self._load(i)
                return image, label, i, failed
            except DECODE_ERRORS:
                failed.append(self._samples.paths[i])
        if self.on_error == "skip":
            return None, int(self._samples.labels[index]), index, failed
        raise MocohubError(f"{MAX_SUBSTITUTES} consecutive images could not be decoded, "
                           f"e.g. {failed[0]}: is {self.root} an image folder?")


def collate_images(items: list[tuple]) -> Batch:
    """Collate ``ImageFolder`` items, dropping skipped ones and gathering the failed paths."""
    failed = [path for *_, paths in items for path in paths]
    kept = [item for item in items if item[0] is not None]
    if not kept:
        return Batch(None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), failed)
    images = default_collate([item[0] for item in kept])
    labels = torch.tensor([item[1] for item in kept], dtype=torch.long)
    indices = torch.tensor([item[2] for item in kept], dtype=torch.long)
    return Batch(images, labels, indices, failed)
