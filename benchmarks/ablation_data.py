"""The ablations' images: a CIFAR-10 subset (the first N file names of each class), made once.

``--data`` is the CIFAR-10 JPEG archive (members train/<class>/*.jpg and test/<class>/*.jpg) or an
unpacked folder with train/ and val/ (or test/), one sub-folder per class. From the archive the
subset is streamed into OUT/data/train and OUT/data/val (the whole archive is never unpacked for a
subset); a folder is used as it is, or hard-linked per class into OUT/data when it holds more than
the size takes. OUT/data/SUBSET.json says what the subset is, so another one is refused there.
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import NamedTuple

from mocohub.errors import MocohubError
from mocohub.fileio import atomic_write

__all__ = ["TAR_NAME", "Images", "default_tar", "class_images", "prepare_data"]

TAR_NAME = "cifar10-jpg.tar.gz"
SUBSET_NAME = "SUBSET.json"
CIFAR_PER_CLASS = {"train": 5000, "val": 1000}  # CIFAR-10's train and test sets, 10 classes
CIFAR_CLASSES = 10
REPO = Path(__file__).resolve().parents[1]


class Images(NamedTuple):
    """The folders a study trains and scores on, and their sizes (for the report)."""

    train: Path
    val: Path
    n_train: int
    n_val: int
    classes: int


def default_tar() -> Path | None:
    """$CIFAR_TAR, else ../shared/data/, else .cifar/ next to this checkout."""
    for candidate in (os.environ.get("CIFAR_TAR"), REPO.parent / "shared" / "data" / TAR_NAME,
                      REPO / ".cifar" / TAR_NAME):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _val_dir(folder: Path) -> Path | None:
    return next((folder / n for n in ("val", "test") if (folder / n).is_dir()), None)


def class_images(folder: Path) -> dict[str, list[str]]:
    """class -> sorted file names (the folder's class sub-folders)."""
    return {c.name: sorted(p.name for p in c.iterdir() if p.is_file() and not p.name.startswith("."))
            for c in sorted(folder.iterdir()) if c.is_dir()}


def _counted(train: Path, val: Path) -> Images:
    val_images = class_images(val)
    return Images(train, val, sum(map(len, class_images(train).values())), sum(map(len, val_images.values())),
                  len(val_images))


def _subset_id(source: Path, per_class: tuple[int | None, int | None]) -> dict[str, object]:
    return {"source": str(source.resolve()), "train_per_class": per_class[0], "val_per_class": per_class[1]}


def _check_subset(dest: Path, wanted: dict[str, object]) -> bool:
    """True when DEST holds the wanted subset; refuse another one (the runs there were trained on it)."""
    mark = dest / SUBSET_NAME
    if not mark.exists():
        return False
    have = json.loads(mark.read_text())
    keys = ("train_per_class", "val_per_class")
    if {k: have.get(k) for k in keys} != {k: wanted[k] for k in keys}:
        raise MocohubError(f"{dest} holds another subset ({have}), not {wanted}: pass another --out")
    return True


def _mark(dest: Path, wanted: dict[str, object]) -> None:
    atomic_write(dest / SUBSET_NAME, lambda p: Path(p).write_text(json.dumps(wanted)))


def _extract_from_tar(tar: Path, dest: Path, per_class: tuple[int | None, int | None]) -> None:
    """Stream the archive once; write the first N file names (sorted) of each class of train/ and test/
    (as val/) into DEST, all of them where N is None. Written to DEST/.partial, then moved in place."""
    limits = {"train": per_class[0], "test": per_class[1]}
    kept: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    partial = dest / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    t0, written = time.perf_counter(), 0
    with tarfile.open(tar, "r:*") as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in limits or \
                    any(p in ("", ".", "..") or p.startswith(".") for p in parts):
                continue
            split, cls, name = parts
            limit = limits[split]
            if limit is None:  # everything: write as it streams
                out = partial / ("val" if split == "test" else "train") / cls / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.extractfile(member).read())
                written += 1
                continue
            bucket = kept.setdefault((split, cls), [])
            if len(bucket) < limit or name < bucket[-1][0]:
                bisect.insort(bucket, (name, archive.extractfile(member).read()))
                del bucket[limit:]
    for (split, cls), files in kept.items():
        folder = partial / ("val" if split == "test" else "train") / cls
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (folder / name).write_bytes(data)
            written += 1
    for split in ("train", "val"):
        if not (partial / split).is_dir():
            raise MocohubError(f"{tar} has no {'test' if split == 'val' else 'train'}/<class>/ images: pass the "
                               f"CIFAR-10 {TAR_NAME} archive")
        shutil.rmtree(dest / split, ignore_errors=True)
        (partial / split).rename(dest / split)
    partial.rmdir()
    print(f"data: {written} images from {tar} into {dest} ({time.perf_counter() - t0:.0f} s)", flush=True)


def _link_subset(folder: Path, dest: Path, per_class: tuple[int | None, int | None]) -> None:
    """The first N names per class of an unpacked folder, hard-linked (copied across file systems)."""
    partial = dest / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    for split, src, limit in (("train", folder / "train", per_class[0]), ("val", _val_dir(folder), per_class[1])):
        for cls, names in class_images(src).items():
            (partial / split / cls).mkdir(parents=True, exist_ok=True)
            for name in names[:limit]:
                try:
                    os.link(src / cls / name, partial / split / cls / name)
                except OSError:
                    shutil.copy2(src / cls / name, partial / split / cls / name)
        shutil.rmtree(dest / split, ignore_errors=True)
        (partial / split).rename(dest / split)
    partial.rmdir()


def _from_folder(source: Path, dest: Path, per_class: tuple[int | None, int | None], dry_run: bool) -> Images:
    val = _val_dir(source)
    if not (source / "train").is_dir() or val is None:
        raise MocohubError(f"--data {source}: a folder needs train/ and val/ (or test/), one sub-folder per class")
    counts = [{c: len(n) for c, n in class_images(d).items()} for d in (source / "train", val)]
    if all(limit is None or max(c.values(), default=0) <= limit for limit, c in zip(per_class, counts)):
        return _counted(source / "train", val)  # the folder as it is
    wanted = _subset_id(source, per_class)
    if dry_run and not _check_subset(dest, wanted):
        n = [sum(min(k, limit or k) for k in c.values()) for limit, c in zip(per_class, counts)]
        return Images(dest / "train", dest / "val", n[0], n[1], len(counts[1]))
    if not _check_subset(dest, wanted):
        _link_subset(source, dest, per_class)
        _mark(dest, wanted)
    return _counted(dest / "train", dest / "val")


def _from_tar(source: Path, dest: Path, per_class: tuple[int | None, int | None], dry_run: bool) -> Images:
    wanted = _subset_id(source, per_class)
    if _check_subset(dest, wanted):
        return _counted(dest / "train", dest / "val")
    if dry_run:
        per = ["all" if n is None else f"the first {n}" for n in per_class]
        print(f"data: would stream {per[0]} training and {per[1]} test images per class from {source} into "
              f"{dest}/train and {dest}/val", flush=True)
        n = [limit or CIFAR_PER_CLASS[split] for limit, split in zip(per_class, ("train", "val"))]
        return Images(dest / "train", dest / "val", n[0] * CIFAR_CLASSES, n[1] * CIFAR_CLASSES, CIFAR_CLASSES)
    dest.mkdir(parents=True, exist_ok=True)
    _extract_from_tar(source, dest, per_class)
    _mark(dest, wanted)
    return _counted(dest / "train", dest / "val")


def prepare_data(data: Path | None, out: Path, per_class: tuple[int | None, int | None],
                 dry_run: bool = False) -> Images:
    """The training and val folders for ``per_class`` (train, val) images per class (None: all),
    made once under OUT/data when needed; a dry run writes nothing."""
    source = data or default_tar()
    if source is None:
        raise MocohubError(f"no CIFAR-10 archive found: pass --data (the {TAR_NAME} archive or a folder with "
                           "train/ and val/ or test/), or set CIFAR_TAR")
    if not source.exists():
        raise MocohubError(f"--data {source}: no such file or folder")
    build = _from_folder if source.is_dir() else _from_tar
    return build(source, out / "data", per_class, dry_run)
