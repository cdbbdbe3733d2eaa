"""A data set's file list in flat arrays, and the folder walk that builds it.

A Python list of (path, label) tuples shared with forked loader workers is copied page by page
into each worker as it is read: reading an object writes its reference count (and the cycle
collector writes its header), so every worker ends up with its own copy of the whole list (tens
of MB for a million files). Here the names are one UTF-8 byte string with an offsets array and
the labels one integer array: a handful of objects, whatever the number of files.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import numpy as np

__all__ = ["Names", "Samples", "list_images"]

ENCODING = ("utf-8", "surrogateescape")  # file names as os.fsencode writes them, undecodable bytes kept


class Names(Sequence[str]):
    """Strings ``prefix + name`` held as one NUL-separated byte string (no file name holds a NUL)
    and the offsets of its parts."""

    def __init__(self, names: Iterable[str], prefix: str = ""):
        names = list(names)
        self.prefix = prefix
        self._blob = ("\0".join(names) + "\0").encode(*ENCODING) if names else b""
        ends = np.flatnonzero(np.frombuffer(self._blob, dtype=np.uint8) == 0)
        self._starts = np.concatenate([[0], ends + 1]).astype(np.int64)  # name i: starts[i] .. starts[i+1] - 1

    def __len__(self) -> int:
        return len(self._starts) - 1

    def _one(self, i: int) -> str:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} names")
        i %= n
        start, end = int(self._starts[i]), int(self._starts[i + 1])
        return self.prefix + self._blob[start:end - 1].decode(*ENCODING)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._one(j) for j in range(*i.indices(len(self)))]
        return self._one(i)

    def relative(self) -> list[str]:
        """Every name without the prefix, decoded at once."""
        return self._blob[:-1].decode(*ENCODING).split("\0") if len(self) else []

    def __iter__(self) -> Iterator[str]:
        prefix = self.prefix
        return (prefix + name for name in self.relative())


class Samples(Sequence[tuple[str, int]]):
    """``(path, label)`` pairs, the paths a ``Names`` and the labels one int64 array."""

    def __init__(self, paths: Names, labels: np.ndarray):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels = paths, np.asarray(labels, dtype=np.int64)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, int]], prefix: str = "") -> Samples:
        """From ``(path, label)`` pairs; ``prefix`` (shared by every path, else ignored) is stored once."""
        pairs = list(pairs)
        paths = [p for p, _ in pairs]
        if not all(p.startswith(prefix) for p in paths):
            prefix = ""
        return cls(Names((p[len(prefix):] for p in paths), prefix), np.array([t for _, t in pairs], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.paths[i], int(self.labels[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return zip(self.paths, self.labels.tolist())


def _entries(folder: str) -> tuple[list[str], list[str]]:
    """(sub-folders, files) of ``folder``, sorted, hidden ones left out; nothing if unreadable
    (as ``os.walk`` follows links and skips what it cannot list)."""
    dirs, files = [], []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                (dirs if is_dir else files).append(entry.name)
    except OSError:
        pass
    dirs.sort()
    files.sort()
    return dirs, files


def list_images(root: str, extensions: Sequence[str]) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """Walk ``root`` as ``os.walk(root, followlinks=True)`` does, folders and files sorted, hidden
    ones skipped: (image names relative to ``root``, (first-level folder, count) per run of
    images, "" for ``root`` itself; the other files' paths). One ``scandir`` per folder and string
    operations only: about 1 us per file."""
    suffixes = tuple(e.lower() for e in extensions)
    images: list[str] = []
    groups: list[tuple[str, int]] = []
    skipped: list[str] = []
    stack = [("", "")]  # (path relative to root, with a trailing "/"; its first-level folder)
    while stack:
        rel, top = stack.pop()
        dirs, files = _entries(os.path.join(root, rel))
        found = [name for name in files if name.lower().endswith(suffixes)]
        if len(found) < len(files):
            kept = set(found)
            skipped += [os.path.join(root, rel + name) for name in files if name not in kept]
        if found:
            images += [rel + name for name in found] if rel else found
            groups.append((top, len(found)))
        stack += [(rel + d + "/", top or d) for d in reversed(dirs)]
    return images, groups, skipped
