"""Decode once: a folder's images held decoded in one shared uint8 buffer.

All images live in a single shared-memory tensor (plus one tensor of offsets and sizes), so
loader workers read them without a copy: forked workers share the pages, and spawned ones
receive a handle to the same memory. One big tensor rather than a list of arrays, because
Python's reference counting writes to every object it touches and would unshare its page.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import MocohubError
from .convert import DECODE_ERRORS, load_rgb

__all__ = ["CACHE_CHOICES", "ImageCache", "available_memory", "cache_budget", "estimate_decoded_bytes"]

CACHE_CHOICES = ("auto", "on", "off")
MAX_CACHE_BYTES = 2 << 30
HEADER_SAMPLE = 64
DECODE_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes without holding the GIL


def available_memory() -> int:
    """Bytes the system can still give without swapping (MemAvailable; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_budget() -> int:
    """The default cache budget: a quarter of the available memory, at most 2 GiB."""
    return min(available_memory() // 4, MAX_CACHE_BYTES)


def _rgb_bytes(path: str) -> int:
    """Decoded RGB size from the header alone (PIL opens lazily); 0 when unreadable."""
    try:
        with Image.open(path) as img:
            width, height = img.size
        return width * height * 3
    except Exception:  # noqa: BLE001 - any unreadable header: the decode will report it
        return 0


def estimate_decoded_bytes(paths: Sequence[str], sample: int = HEADER_SAMPLE) -> int:
    """Decoded size of all images, from the headers of up to ``sample`` evenly spaced ones."""
    step = max(1, len(paths) // sample)
    sizes = [_rgb_bytes(p) for p in paths[::step][:sample]]
    return int(sum(sizes) / len(sizes) * len(paths))


class ImageCache:
    """Every image of ``paths`` decoded to RGB uint8, in one shared buffer.

    ``cache[i]`` is image i as a (3, H, W) uint8 view (HWC in memory); it raises ``OSError`` for
    an image that could not be decoded, as opening the file would, so callers handle both alike.
    """

    def __init__(self, paths: Sequence[str], budget: int):
        self.paths = paths
        sizes = torch.tensor([_rgb_bytes(p) for p in paths], dtype=torch.int64)
        total = int(sizes.sum())
        if total > budget:
            raise MocohubError(f"the {len(paths)} decoded images need {total / 2**20:.0f} MiB, over the image "
                               f"cache budget of {budget / 2**20:.0f} MiB: use cache_images='off' to stream "
                               "them from disk, or raise cache_budget")
        offsets = torch.cumsum(sizes, 0) - sizes
        self.index = torch.zeros(len(paths), 3, dtype=torch.int64)  # offset, height, width (0: failed)
        self.index[:, 0] = offsets
        self.data = torch.empty(total, dtype=torch.uint8).share_memory_()
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            for i, shape in enumerate(pool.map(self._decode, range(len(paths)), offsets.tolist(), sizes.tolist())):
                self.index[i, 1:] = torch.tensor(shape)
        self.index.share_memory_()

    def _decode(self, i: int, offset: int, size: int) -> tuple[int, int]:
        """Decode image i into its slot; (height, width), or (0, 0) when it cannot be decoded."""
        try:
            array = np.asarray(load_rgb(self.paths[i]))
        except DECODE_ERRORS:
            return 0, 0
        if array.size != size:  # the header lied
            return 0, 0
        self.data[offset:offset + size].numpy()[:] = array.reshape(-1)
        return array.shape[0], array.shape[1]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def failed(self) -> list[str]:
        return [self.paths[i] for i in (self.index[:, 1] == 0).nonzero().flatten().tolist()]

    def __getitem__(self, i: int) -> torch.Tensor:
        offset, height, width = self.index[i].tolist()
        if height == 0:
            raise OSError(f"could not decode {self.paths[i]}")
        return self.data[offset:offset + height * width * 3].view(height, width, 3).permute(2, 0, 1)
