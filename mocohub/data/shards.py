"""WebDataset shards: written from a folder, read back by index with every guarantee of a folder.

Writing (``write_shards``) uses ``webdataset.ShardWriter``: a sample is the image's original
encoded bytes as ``<key>.<ext>`` plus ``<key>.cls`` (the class index, when the folder has class
sub-folders), the key being the image's path relative to the folder without its extension (dots
and ``%`` escaped as ``%2E``/``%25``: WebDataset ends a key at the first dot). So the class and the
path travel in the key, and a sample's name is the same under a folder and under its shards.

Reading (``ShardImages``) is map-style: every shard's member names and byte offsets are indexed
once at the start, from the index file ``mocohub shards`` writes beside each shard or else from
the tar headers (no image read or decoded), and sample i is read at its offset. Sampling,
epochs, per-sample augmentation seeds and mid-epoch resume are then exactly the folder's
(``ResumableSampler`` over ``len(dataset)``): every image once per epoch across all processes
under the same global batches, and a resume starts at its step reading only the images left.
webdataset's own reader streams instead, and cannot give these guarantees:

- exact once per epoch with a global batch: ``split_by_node`` deals whole shards to processes,
  so processes get unequal sample counts unless every shard holds the same number and the shard
  count divides by processes x loader workers; the surplus is dropped or repeated
  (``with_epoch``) to keep the processes in step, and a global batch mixes the few shards its
  processes stream (a shuffle buffer), not the whole data set;
- exact resume: a stream has no position but the one reached by reading, so a resume re-reads
  every skipped member of its shards (and replays the shuffle buffer to find the same order),
  and another process count deals the shards differently, so the batches differ.

benchmarks/bench_shards.py measures both. Reading by offset needs plain (uncompressed) ``.tar``
files on a file system (a local disk, NFS, or an object store mounted with a FUSE driver); it
reads one image per seek, where a stream reads whole shards in order.
"""
from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, NamedTuple
from urllib.parse import unquote

import numpy as np
from tqdm import tqdm

from ..errors import MocohubError
from ..fileio import atomic_write, disk_full, disk_full_error
from .cache import ImageCache, open_cache
from .convert import load_rgb
from .defaults import DEFAULT_SHARD_BYTES
from .folder import IMAGE_EXTENSIONS, ImageFolder, check_options

__all__ = ["SHARDS_INSTALL", "DEFAULT_SHARD_BYTES", "ShardImages", "Shard", "index_shard", "is_shard_source",
           "scan_shard", "shard_paths", "write_shards"]

SHARDS_INSTALL = "pip install 'mocohub[shards]' (or pip install webdataset)"
MANIFEST_SUFFIX = ".shards.json"
INDEX_SUFFIX = ".index.json"
FORMAT = "mocohub-shards/1"
MAX_OPEN_SHARDS = 64  # file handles kept open per process: random access touches every shard
TRAILER_CHECK = 1 << 20  # bytes after the last member read to tell end padding from a damaged header
_URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # pipe:, s3:, http:


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise MocohubError(f"shards need the webdataset package: {SHARDS_INSTALL}", exit_code=1) from None
    return webdataset


def sample_key(rel: str) -> str:
    """The WebDataset key of the image at relative path ``rel``: the path without its extension."""
    stem = rel[:len(rel) - len(Path(rel).suffix)]
    return stem.replace("%", "%25").replace(".", "%2E")


# -- reading --------------------------------------------------------------------------------------

def is_shard_source(source: str | os.PathLike | Sequence[str]) -> bool:
    """Whether ``source`` names shards (a list, a ``.tar`` file, a brace pattern) rather than a folder."""
    if isinstance(source, (list, tuple)):
        return True
    text = os.fspath(source)
    return text.endswith(".tar") or "{" in text or "::" in text


def shard_paths(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """The shard files of ``source`` (brace-expanded by webdataset, ``::`` joins lists); a
    ``MocohubError`` naming the first missing one before anything is read."""
    if isinstance(source, (list, tuple)):
        paths = [os.fspath(p) for p in source]
    else:
        text = os.fspath(source)
        paths = _webdataset().shardlists.expand_urls(text) if "{" in text or "::" in text else [text]
    remote = [p for p in paths if _URL.match(p) and not Path(p).exists()]
    if remote:
        raise MocohubError(f"{remote[0]}: shards are read by offset, from files: copy them to a disk or mount "
                           "the bucket (e.g. s3fs, gcsfuse) and pass the local pattern")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise MocohubError(f"{len(missing)} of the {len(paths)} shards do not exist, e.g. {missing[0]}: check the "
                           "pattern (brace ranges such as 'train-{000000..000127}.tar') and that every shard was "
                           "written (mocohub shards prints the pattern)")
    return paths


class Shard(NamedTuple):
    """One shard's regular members (name, data offset, size) from its headers, what was wrong, and
    the names of members its index file lists that damage took out of it."""

    members: list[tuple[str, int, int]]
    problems: list[str]
    lost: list[str] = []


def scan_shard(path: str) -> Shard:
    """Read the tar headers only (seeking over the data): names, offsets and sizes of the files.

    A damaged header is stepped over (``ignore_zeros`` resynchronises on the next valid one) and
    shows as a gap between members; a file cut short ends inside its last member, which stays
    listed (reading it fails, counted like a corrupt file); the members cut off are lost."""
    size, problems, members = os.path.getsize(path), [], []
    try:
        tar = tarfile.open(path, "r:")  # reads the first header: not a tar file fails here
    except tarfile.ReadError as e:
        raise MocohubError(f"{path} is not an uncompressed tar file ({e}): shards are read by offset, so "
                           "write them with mocohub shards (or decompress .tar.gz shards)") from None
    tar.ignore_zeros = True  # from the second header on
    end = 0  # where the next header should start
    with tar:
        while True:
            try:
                member = tar.next()
            except tarfile.ReadError:  # the data of the last header runs past the end of the file
                member = None
            if member is None:
                break
            if member.offset != end:
                problems.append(f"a damaged tar header at byte {end} (the sample there is lost)")
            if member.isreg():
                members.append((member.name, member.offset_data, member.size))
            end = member.offset_data + _padded(member.size)
    tail = size - end
    if members and members[-1][1] + members[-1][2] > size:
        problems.append(f"the file ends inside {members[-1][0]} (truncated: the samples after it are lost)")
    elif tail > TRAILER_CHECK or tail > 0 and _nonzero(path, end, tail):
        problems.append(f"a damaged tar header after byte {end} (the samples after it are lost)")
    return Shard(members, problems)


def _padded(size: int) -> int:
    """A member's data length in the archive: whole 512-byte blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def index_shard(path: str) -> Shard:
    """The shard's members from its index file ``<shard>.index.json`` (written by ``mocohub shards``)
    when it still describes the shard (the same file size, the last member's header where it says,
    the end of the archive after it), else from the tar headers: an index loads in milliseconds, a
    header scan takes about 40 us per member. A damaged shard's index names the members lost."""
    saved = _load_index(path)
    if saved is not None and _describes(path, saved):
        return Shard(saved["members"], [])
    shard = scan_shard(path)
    if saved is not None and shard.problems:
        there = {name for name, _, _ in shard.members}
        shard = shard._replace(lost=[name for name, _, _ in saved["members"] if name not in there])
    return shard


def _load_index(path: str) -> dict[str, Any] | None:
    try:
        saved = json.loads(Path(path + INDEX_SUFFIX).read_text())
        return {"size": int(saved["size"]), "members": [(str(n), int(o), int(z)) for n, o, z in saved["members"]]}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no index, or not one of ours


def _describes(path: str, saved: dict[str, Any]) -> bool:
    """Whether the index fits the file: its size, the last member's header, the end after it."""
    if not saved["members"] or saved["size"] != os.path.getsize(path):
        return False
    _, offset, size = saved["members"][-1]
    try:
        with open(path, "rb") as f:
            f.seek(offset - tarfile.BLOCKSIZE)
            header = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
            f.seek(offset + _padded(size))
            return header.size == size and not any(f.read(tarfile.BLOCKSIZE))
    except (OSError, ValueError, tarfile.TarError):
        return False


def _save_index(path: str, shard: Shard) -> None:
    """Keep a clean shard's member list beside it, for ``index_shard``."""
    index = {"size": os.path.getsize(path), "members": shard.members}
    atomic_write(path + INDEX_SUFFIX, lambda tmp: Path(tmp).write_text(json.dumps(index, separators=(",", ":"))))


def _nonzero(path: str, offset: int, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        return any(f.read(size))


def _group(members: list[tuple[str, int, int]]) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Consecutive members sharing a key, as samples ``(key, [(extension, offset, size), ...])``;
    WebDataset's key is the name up to the first dot of its last part."""
    samples: list[tuple[str, list[tuple[str, int, int]]]] = []
    for name, offset, size in members:
        folder, slash, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        key = folder + slash + stem
        if samples and samples[-1][0] == key:
            samples[-1][1].append((ext, offset, size))
        else:
            samples.append((key, [(ext, offset, size)]))
    return samples


@contextmanager
def _no_gc() -> Iterator[None]:
    """Build large lists of small tuples without the cycle collector, which would rescan the growing
    lists every few hundred allocations (x3 the time of an index of 50,000 samples); they hold no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Members(Sequence):
    """Sample i's encoded image as a fresh in-memory file: what ``ImageCache`` decodes for shards."""

    def __init__(self, data: "ShardImages"):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.data.open_member(i)


class ShardImages(ImageFolder):
    """The images of WebDataset shards as a map-style dataset with ``ImageFolder``'s interface.

    ``source``: a ``.tar`` file, a brace pattern (``'/data/train-{000000..000127}.tar'``), or a
    list of shard files. A sample is the members sharing a key; its image is the member whose
    extension is an image extension (the first, if several). Labels, as a folder's: from the
    key's first folder when every key has one (what ``mocohub shards`` writes), else from
    ``<key>.cls`` when every sample has one (the WebDataset convention; classes named "0", "1", ...),
    else -1. ``samples[i][0]`` is the image's path as if the shards were unpacked in their
    folder (``root``), the same relative name as in the folder they were written from.
    Samples without an image are listed in ``skipped``; an image that cannot be read or decoded
    (a corrupt member, a truncated shard) is replaced or dropped as in a folder (``on_error``).
    ``cache_images`` and ``cache_budget`` as for a folder, with one decoded copy per process
    (``cache_barrier`` is taken for the same signature, and not used).
    """

    def __init__(self, source: str | os.PathLike | Sequence[str], transform: Callable | None = None, *,
                 on_error: str = "substitute", extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 seed: int | None = None, cache_images: str = "off", cache_budget: int | None = None,
                 cache_barrier: Callable[[], None] | None = None):
        check_options(on_error, cache_images)
        self.shards = shard_paths(source)
        self.root = Path(os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p in self.shards]))
        self.transform, self.on_error = transform, on_error
        self.seed, self.epoch = seed, 0
        self._files: OrderedDict[int, IO[bytes]] = OrderedDict()
        with _no_gc():
            names, labels, where = self._index(extensions)
            if not names:
                raise MocohubError(f"no images found in the {len(self.shards)} shard(s) {self.shards[0]}... "
                                   f"(looked for the extensions {', '.join(extensions)})")
            self._where = np.asarray(where, dtype=np.int64)  # shard, offset, size per sample
            targets, self.classes = self._labels(names, labels)
            self.samples = [(f"{self.root}/{n}", t) for n, t in zip(names, targets)]
        if self.skipped:
            warnings.warn(f"{len(self.skipped)} sample(s) without an image in the shards ignored, "
                          f"e.g. {self.skipped[0]}", stacklevel=2)
        # each process decodes its own copy: the node-shared copy (cache_barrier) names its memory
        # file after the image paths, which the cache here reads as in-memory files
        self.cache: ImageCache | None
        self.cache, self.cache_note = open_cache(_Members(self), cache_images, cache_budget)

    def _index(self, extensions: Sequence[str]) -> tuple[list[str], list, list[tuple[int, int, int]]]:
        """Each sample's name (the image's relative path), ``.cls`` member, and (shard, offset, size)."""
        names, labels, where, self.skipped = [], [], [], []
        image_exts = {e.lstrip(".").lower() for e in extensions}
        for s, path in enumerate(self.shards):
            shard = index_shard(path)
            for problem in shard.problems:
                warnings.warn(f"shard {path}: {problem}", stacklevel=3)
            lost = self._lost_images(shard, image_exts)
            if lost:
                warnings.warn(f"shard {path}: {len(lost)} image(s) its index lists are gone (counted as skipped), "
                              f"e.g. {next(iter(lost.values()))}", stacklevel=3)
            self.skipped.extend(lost.values())
            for key, parts in _group(shard.members):
                image = next((p for p in parts if p[0].lower() in image_exts), None)
                if image is None:
                    if key not in lost:  # else counted above (e.g. its .cls survived)
                        self.skipped.append(f"{self.root}/{unquote(key)}.{parts[0][0]}")
                    continue
                ext, offset, size = image
                names.append(f"{unquote(key)}.{ext}")
                labels.append(next((p for p in parts if p[0] == "cls"), None))
                where.append((s, offset, size))
        return names, labels, where

    def _lost_images(self, shard: Shard, image_exts: set[str]) -> dict[str, str]:
        """{key: image name} of the samples whose image the damage took (their other members may remain)."""
        lost = {}
        for key, parts in _group([(name, 0, 0) for name in shard.lost]):
            ext = next((e for e, _, _ in parts if e.lower() in image_exts), None)
            if ext is not None:
                lost[key] = f"{self.root}/{unquote(key)}.{ext}"
        return lost

    def _labels(self, names: list[str], cls_members: list) -> tuple[list[int], list[str]]:
        """As a folder: the first folder of the name; else the ``.cls`` members; else none (-1)."""
        folders = [n.partition("/") for n in names]
        if all(slash for _, slash, _ in folders):
            classes = sorted({first for first, _, _ in folders})
            index = {c: i for i, c in enumerate(classes)}
            return [index[first] for first, _, _ in folders], classes
        if all(m is not None for m in cls_members):
            shard_of = self._where[:, 0].tolist()
            text = [self._read(s, m[1], m[2]).strip() for s, m in zip(shard_of, cls_members)]
            if all(t.isdigit() for t in text):
                targets = [int(t) for t in text]
                return targets, [str(c) for c in range(max(targets) + 1)]
        return [-1] * len(names), []

    def _file(self, shard: int) -> IO[bytes]:
        """An open handle on a shard, the last ``MAX_OPEN_SHARDS`` kept (one evicted closes when its
        last reader lets go of it)."""
        f = self._files.pop(shard, None) or open(self.shards[shard], "rb")
        self._files[shard] = f
        if len(self._files) > MAX_OPEN_SHARDS:
            self._files.popitem(last=False)
        return f

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        """Positional reads: forked loader workers and the cache's decoding threads share no file offset."""
        if hasattr(os, "pread"):
            f = self._file(shard)
            data = os.pread(f.fileno(), size, offset)
        else:  # Windows: no positional read, so a handle per read
            with open(self.shards[shard], "rb") as f:
                f.seek(offset)
                data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.shards[shard]} ends inside the member at byte {offset} (truncated)")
        return data

    def open_member(self, index: int) -> IO[bytes]:
        """Sample ``index``'s encoded image, as an in-memory file."""
        shard, offset, size = self._where[index].tolist()
        return io.BytesIO(self._read(shard, offset, size))

    def _image(self, index: int):
        return load_rgb(self.open_member(index)) if self.cache is None else super()._image(index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": OrderedDict()}  # open files do not pickle (spawned workers)


# -- writing --------------------------------------------------------------------------------------

def _prefix(root: Path) -> str:
    """The shards' file prefix: the folder's name (``train``, ``val``), in safe characters."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", root.resolve().name) or "shards"


def _pattern(out: Path, prefix: str, count: int) -> str:
    last = f"{count - 1:06d}"
    return str(out / (f"{prefix}-000000.tar" if count == 1 else f"{prefix}-{{000000..{last}}}.tar"))


def _finished(out: Path, prefix: str) -> list[Path]:
    """The shards completed so far, in order (a shard is renamed from ``.partial`` once closed)."""
    done = []
    while (out / f"{prefix}-{len(done):06d}.tar").exists():
        done.append(out / f"{prefix}-{len(done):06d}.tar")
    return done


def _keys(paths: Sequence[Path]) -> list[str]:
    return [key for p in paths for key, _ in _group(index_shard(str(p)).members)]


def _check_and_index(paths: Sequence[Path]) -> list[str]:
    """The keys in the finished shards, from their tar headers; each clean shard's index saved."""
    keys = []
    for path in paths:
        shard = scan_shard(str(path))
        if shard.problems:
            raise MocohubError(f"{path}: {shard.problems[0]}: delete it and the shards after it, then write again")
        _save_index(str(path), shard)
        keys.extend(key for key, _ in _group(shard.members))
    return keys


def write_shards(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> dict[str, Any]:
    """Write the images of ``data_dir`` (any layout ``ImageFolder`` reads) as WebDataset shards
    ``OUT/<folder name>-NNNNNN.tar`` of about ``shard_bytes`` of images each, in the folder's order.

    Resumable: re-running continues after the last finished shard (an interrupted one is
    rewritten), and the shards are byte-identical to an uninterrupted write (fixed mtimes). A
    manifest ``OUT/<folder name>.shards.json`` records the source and settings, so another
    folder or shard size is refused instead of mixed in. The end re-reads every shard's headers
    and checks the count and the keys against the folder. Returns the manifest, with
    ``resumed_from``: the images found written already.
    """
    wds = _webdataset()
    folder = ImageFolder(data_dir)
    root, out = folder.root, Path(out_dir)
    rel = [Path(p).relative_to(root).as_posix() for p, _ in folder.samples]
    keys = [sample_key(r) for r in rel]
    first = {}
    for name, key in zip(rel, keys):
        if first.setdefault(key, name) != name:
            raise MocohubError(f"{first[key]} and {name} would be one WebDataset sample (its files share the key "
                               f"{key}): rename one of them")
    prefix = _prefix(root)
    state = {"format": FORMAT, "source": str(root.resolve()), "images": len(rel),
             "names_sha256": hashlib.sha256("\n".join(rel).encode()).hexdigest()[:16], "shard_bytes": shard_bytes}
    manifest_path = out / f"{prefix}{MANIFEST_SUFFIX}"
    manifest = _start(manifest_path, state)
    if manifest.get("complete"):
        return {**manifest, "resumed_from": len(rel)}
    done = _finished(out, prefix)
    for leftover in out.glob(f"{prefix}-*.tar.partial"):
        leftover.unlink()
    start = len(_keys(done))
    try:
        if start < len(rel):
            _write(wds, folder, keys[start:], range(start, len(rel)), out, prefix, len(done), shard_bytes, progress)
    except OSError as e:
        if disk_full(e, out):
            raise disk_full_error(out / f"{prefix}-{len(_finished(out, prefix)):06d}.tar",
                                  "the finished shards are kept") from e
        raise
    shards = _finished(out, prefix)
    written = _check_and_index(shards)
    if written != keys:
        raise MocohubError(f"the shards in {out} hold {len(written)} samples, {data_dir} has {len(keys)} images "
                           f"(or other names): the folder changed while writing; delete {out} and write again")
    manifest.update(complete=True, pattern=_pattern(out, prefix, len(shards)), shards=[p.name for p in shards],
                    classes=folder.classes, skipped=len(folder.skipped),
                    bytes=sum(p.stat().st_size for p in shards))
    _save_manifest(manifest_path, manifest)
    return {**manifest, "resumed_from": start}


def _write(wds, folder: ImageFolder, keys: list[str], indices: range, out: Path, prefix: str, first_shard: int,
           shard_bytes: int, progress: bool) -> None:
    """Samples ``indices`` of ``folder`` into shards from number ``first_shard`` on. The shard being
    written when an error (or Ctrl-C) stops it stays ``.partial``: only a closed shard is published."""
    pattern = os.path.join(str(out).replace("%", "%%"), f"{prefix}-%06d.tar.partial")
    writer = wds.ShardWriter(pattern, maxsize=shard_bytes, maxcount=sys.maxsize, start_shard=first_shard,
                             verbose=0, encoder=False, mtime=0, post=_publish)
    try:
        for i, key in zip(tqdm(indices, disable=not progress, desc="shards", unit="img", file=sys.stderr), keys):
            path, label = folder.samples[i]
            sample = {"__key__": key, Path(path).suffix[1:]: Path(path).read_bytes()}
            if folder.classes:
                sample["cls"] = str(label).encode()
            writer.write(sample)
    except BaseException:
        writer.post = None
        raise
    finally:
        writer.close()


def _publish(partial: str) -> None:
    """A finished shard gets its final name: what exists without ``.partial`` is complete."""
    os.replace(partial, partial[:-len(".partial")])


def _start(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue (same source and settings), or a fresh one; another write is refused."""
    if path.exists():
        manifest = json.loads(path.read_text())
        differs = [k for k, v in state.items() if manifest.get(k) != v]
        if differs:
            raise MocohubError(f"{path.parent} holds shards of another write ({', '.join(differs)} differ: "
                               f"{manifest.get('source')}): choose another OUT_DIR, or delete its {path.name} and "
                               "shards to write them again")
        return manifest
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_manifest(path, {**state, "complete": False})
    return {**state, "complete": False}


def _save_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
