"""Decode once: a folder's images held decoded in one shared uint8 buffer.

All images live in a single shared-memory tensor (plus one tensor of offsets and sizes), so
loader workers read them without a copy: forked workers share the pages, and spawned ones
receive a handle to the same memory. One big tensor rather than a list of arrays, because
Python's reference counting writes to every object it touches and would unshare its page.

Shared memory is a file system (``/dev/shm``), often far smaller than the machine's memory
(Docker's default is 64 MB): writing past its free space kills the process with SIGBUS, so the
budget comes from its free space, divided among the node's processes that each hold a copy.
Given a barrier over the node's processes, ``open_cache`` decodes once per node instead: local
rank 0 fills a named file there, the others map it.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from multiprocessing.reduction import DupFd
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Callable, Sequence

import torch

from ..errors import MocohubError
from .convert import DECODE_ERRORS
from .decode import decode_rgb, header_size, read_bytes

__all__ = ["CACHE_CHOICES", "SHM_DIR", "ImageCache", "available_memory", "shm_free_bytes", "local_processes",
           "cache_budget", "cache_plan", "open_cache", "estimate_decoded_bytes"]

CACHE_CHOICES = ("auto", "on", "off")
MAX_CACHE_BYTES = 2 << 30
HEADER_SAMPLE = 64
DECODE_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes without holding the GIL
CHUNK = 256  # images per task of the decoding threads: a task's overhead spread, the threads kept busy
KEEP_ENCODED = 512 << 20  # encoded bytes held from the sizes' pass for the decode; the rest is read again
SHM_DIR = "/dev/shm"  # where torch's shared CPU tensors live (shm_open)


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


def shm_free_bytes(path: str = SHM_DIR) -> int:
    """Free space of the shared-memory file system (the available memory where there is none)."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return available_memory()
    return stat.f_bavail * stat.f_frsize


def local_processes() -> int:
    """The processes of this node (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _budget(copies: int, shm_free: int, memory: int) -> int:
    return min(shm_free // copies, memory // 4 // copies, MAX_CACHE_BYTES)


def cache_budget(copies: int | None = None, *, shm_free: int | None = None, memory: int | None = None) -> int:
    """Bytes one copy of the cache may take when ``copies`` copies live on this node (default: one
    per local process): the shared-memory file system's free space and a quarter of the available
    memory, shared among the copies, at most 2 GiB."""
    return _budget(copies or local_processes(), shm_free_bytes() if shm_free is None else shm_free,
                   available_memory() if memory is None else memory)


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def cache_plan(decoded: int, copies: int, shm_free: int, memory: int) -> tuple[bool, str]:
    """Whether ``copies`` copies of ``decoded`` bytes fit this node, and one line that says why."""
    times = f" x {copies} processes" if copies > 1 else ""
    if decoded <= _budget(copies, shm_free, memory):
        return True, f"image cache on: {_mb(decoded)} decoded{times}, {_mb(shm_free)} free in {SHM_DIR}"
    if decoded * copies > shm_free:
        why = f"{SHM_DIR} has {_mb(shm_free)} free, the decoded set needs {_mb(decoded)}{times}"
    elif decoded * copies > memory // 4:
        why = f"the decoded set needs {_mb(decoded)}{times}, over a quarter of the {_mb(memory)} available memory"
    else:
        why = f"the decoded set needs {_mb(decoded)}, over the cache's cap of {_mb(MAX_CACHE_BYTES)}"
    return False, f"image cache off: {why}; streaming from disk"


Source = Callable[[int], "str | IO[bytes]"]  # what PIL opens for image i: a path or a file object


def _read(image: str | IO[bytes]) -> bytes | None:
    """The encoded image; None when it cannot be read (the decode reports it as failed)."""
    try:
        return read_bytes(image)
    except OSError:
        return None


def _rgb_bytes(data: bytes | None) -> int:
    """Decoded RGB size from the header alone; 0 when unreadable."""
    if data is None:
        return 0
    width, height = header_size(data)
    return width * height * 3


def estimate_decoded_bytes(paths: Sequence[str], sample: int = HEADER_SAMPLE, *,
                           open_image: Source | None = None) -> int:
    """Decoded size of all images, from the headers of up to ``sample`` evenly spaced ones."""
    step = max(1, len(paths) // sample)
    source = open_image or paths.__getitem__
    sizes = [_rgb_bytes(_read(source(i))) for i in range(0, len(paths), step)[:sample]]
    return int(sum(sizes) / len(sizes) * len(paths))


class ImageCache:
    """Every image of ``paths`` decoded to RGB uint8, in one shared buffer.

    ``cache[i]`` is image i as a (3, H, W) uint8 view (HWC in memory); it raises ``OSError`` for
    an image that could not be decoded, as opening the file would, so callers handle both alike.
    With ``file`` the buffer (index, then pixels) is that file, mapped shared, for other
    processes to ``attach``; without it, an anonymous shared-memory tensor. ``open_image(i)``
    gives what to decode for image i (default ``paths[i]``; e.g. a shard member's bytes).
    Threads over chunks of images read the sizes from the headers, then decode (``decode_rgb``:
    an RGB JPEG by libjpeg directly) into each image's slot of the buffer.
    """

    def __init__(self, paths: Sequence[str], budget: int, *, file: str | None = None,
                 open_image: Source | None = None):
        self.paths = paths
        source = open_image or paths.__getitem__
        chunks = [range(start, min(start + CHUNK, len(paths))) for start in range(0, len(paths), CHUNK)]

        def headers(chunk: range) -> tuple[list[int], list[bytes | None]]:
            encoded = [_read(source(i)) for i in chunk]
            return [_rgb_bytes(data) for data in encoded], encoded

        def decode(chunk: range, encoded: list[bytes | None] | None) -> list[tuple[int, int]]:
            if encoded is None:  # not kept: read again
                encoded = [_read(source(i)) for i in chunk]
            return [_decode_into(pixels, data, *slots[i]) for i, data in zip(chunk, encoded)]

        with ThreadPoolExecutor(DECODE_THREADS) as pool:  # two passes: the sizes, then the pixels in place
            sizes, kept, held = [], [], 0
            for part, encoded in pool.map(headers, chunks):
                sizes += part
                held += sum(len(data) for data in encoded if data is not None)
                kept.append(encoded if held <= KEEP_ENCODED else None)
            sizes = torch.tensor(sizes, dtype=torch.int64)
            total = int(sizes.sum())
            if total > budget:
                raise MocohubError(f"the {len(paths)} decoded images need {total / 2**20:.0f} MiB, over the image "
                                   f"cache budget of {budget / 2**20:.0f} MiB: use cache_images='off' to stream "
                                   "them from disk, or raise cache_budget")
            offsets = torch.cumsum(sizes, 0) - sizes
            self._fd = None
            if file is None:
                self.index = torch.zeros(len(paths), 3, dtype=torch.int64).share_memory_()
                self.data = torch.empty(total, dtype=torch.uint8).share_memory_()
            else:
                self._map(file, total)
            self.index[:, 0] = offsets  # offset, height, width (0: failed)
            pixels = memoryview(self.data.numpy())
            slots = list(zip(offsets.tolist(), sizes.tolist()))
            shapes = [shape for part in pool.map(decode, chunks, kept) for shape in part]
            self.index[:, 1:] = torch.tensor(shapes, dtype=torch.int64).view(len(paths), 2)

    def _map(self, file: str, total: int) -> None:
        """Index and pixels as views of one shared mapping of ``file``, created at that size."""
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, len(self.paths) * 3 * 8 + total)
        self._view(fd)

    def _view(self, fd: int) -> None:
        """Map the open file ``fd`` (kept, so a spawned loader worker can receive it after the
        name is gone; forked ones share the mapping as it is)."""
        self._fd = fd
        buffer = torch.frombuffer(mmap.mmap(fd, os.fstat(fd).st_size), dtype=torch.uint8)
        head = len(self.paths) * 3 * 8
        self.index = buffer[:head].view(torch.int64).view(len(self.paths), 3)
        self.data = buffer[head:]

    @classmethod
    def attach(cls, paths: Sequence[str], file: str) -> ImageCache:
        """The cache another process decoded into ``file``."""
        cache = cls.__new__(cls)
        cache.paths = paths
        cache._view(os.open(file, os.O_RDWR))
        return cache

    def __getstate__(self) -> dict:
        if self._fd is None:  # torch's shared tensors pickle as handles themselves
            return self.__dict__
        return {"paths": self.paths, "fd": DupFd(self._fd)}  # the file's descriptor, passed to the process

    def __setstate__(self, state: dict) -> None:
        if "fd" in state:
            self.paths = state["paths"]
            self._view(state["fd"].detach())
        else:
            self.__dict__.update(state)

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


def _decode_into(pixels: memoryview, data: bytes | None, offset: int, size: int) -> tuple[int, int]:
    """Decode an image into its slot of ``pixels``; (height, width), or (0, 0) when it cannot be
    read or decoded (or has not the size its header said)."""
    if data is None or size == 0:
        return 0, 0
    try:
        (width, height), rgb = decode_rgb(data)
    except DECODE_ERRORS:
        return 0, 0
    if len(rgb) != size:
        return 0, 0
    pixels[offset:offset + size] = rgb
    return height, width


def _node_file(paths: Sequence[str]) -> str:
    """A name every process of this job on this node derives alike, and no other job does."""
    job = ":".join(os.environ.get(v, "") for v in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
    digest = hashlib.sha1("\n".join([job, *paths]).encode()).hexdigest()[:16]
    return os.path.join(SHM_DIR, f"mocohub-cache-{digest}")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _share_on_node(cache: ImageCache | None, paths: Sequence[str], file: str,
                   barrier: Callable[[], None]) -> ImageCache | None:
    """After local rank 0 filled ``file`` (or did not): the others map it, then its name goes."""
    barrier()  # rank 0's file is complete (or absent)
    if cache is None and os.path.exists(file):
        cache = ImageCache.attach(paths, file)
    barrier()  # everyone has mapped it: the name can go, the memory stays until the last unmaps
    if _local_rank() == 0 and os.path.exists(file):
        os.unlink(file)
    return cache


def open_cache(paths: Sequence[str], mode: str, budget: int | None = None, *,
               barrier: Callable[[], None] | None = None,
               open_image: Source | None = None) -> tuple[ImageCache | None, str]:
    """The image cache of ``paths`` for ``mode`` (auto, on, off), and one line that says why.

    Without ``barrier`` (or alone on the node) each process holds its own copy. With a barrier that
    every process of the job enters, local rank 0 of each node decodes into a named file in
    shared memory and the others map it: one copy per node; they follow rank 0's outcome.
    ``open_image`` as in ``ImageCache``. ``mode="on"`` raises ``MocohubError`` where the cache
    does not fit (every process alike).
    """
    if mode == "off":
        return None, "image cache off"
    shared = barrier is not None and local_processes() > 1
    if shared:
        barrier()  # nothing of this cache is allocated yet: every process reads the same free space
    copies = 1 if shared else local_processes()
    decoded = estimate_decoded_bytes(paths, open_image=open_image)
    shm_free, memory = shm_free_bytes(), available_memory()
    fits, why = cache_plan(decoded, copies, shm_free, memory)
    if budget is None:
        budget = _budget(copies, shm_free, memory)
    elif decoded <= budget:  # an explicit budget wins over the free space
        fits, why = True, f"image cache on: {_mb(decoded)} decoded, within the budget of {_mb(budget)}"
    else:
        fits, why = False, f"image cache off: the decoded set needs {_mb(decoded)}, over the budget of {_mb(budget)}"
    file = _node_file(paths) if shared else None
    cache, error = None, None
    if (fits or mode == "on") and (not shared or _local_rank() == 0):
        if file is not None and os.path.exists(file):
            os.unlink(file)  # left by a crashed run of the same job
        try:
            cache = ImageCache(paths, budget, file=file, open_image=open_image)
        except MocohubError as e:
            error, why = e, f"image cache off: {e}"
    if shared:
        cache = _share_on_node(cache, paths, file, barrier)
    if cache is None and mode == "on":
        raise error or MocohubError("cache_images='on': local rank 0 could not build the image cache (see its "
                                    "message); use cache_images='off' to stream from disk")
    if cache is None and fits and error is None:
        why = "image cache off: local rank 0 did not build it; streaming from disk"
    elif cache is not None and not fits:
        why = f"image cache on (as asked): {_mb(cache.data.numel())} decoded"
    return cache, why
