"""Verified downloads into torch.hub's cache, plus a safetensors cache of the converted backbone.

A cache entry is keyed by the full URL (two ``checkpoint.pth.tar`` at different URLs are two
entries) and is found only if it is known good: a file reaches the cache after its size, hash and
complete transfer are checked and it loads as a checkpoint, always by an atomic rename of a
temporary file, so neither a kill mid-transfer nor two processes at once leave a torn file under
its name. Beside it, ``<file>.json`` records its size and full md5/sha256, so a later expectation
(another hash, a published size) is checked against the very bytes cached without re-reading them.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from ..errors import MocohubError
from ..fileio import atomic_write
from .formats import Backbone, convert, read_checkpoint
from .pretrained import CONFIG_NAME, read_pretrained_dir, write_pretrained

__all__ = ["checkpoint_dir", "cache_file", "parse_hash", "download", "cached_backbone"]

_CHUNK = 1 << 20


def checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints``, where torch.hub keeps downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_file(url: str) -> Path:
    """The cache path of ``url``: its file name with a short hash of the whole URL before the suffixes."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise MocohubError(f"cannot name a cache file after {url!r}: the URL has no file name")
    stem, dot, suffixes = name.partition(".")
    return checkpoint_dir() / f"{stem}.{hashlib.sha256(url.encode()).hexdigest()[:12]}{dot}{suffixes}"


def parse_hash(spec: str) -> tuple[str, str]:
    """``"md5:<hex>"`` or ``"sha256:<hex>"`` (a bare hex string means sha256); prefixes allowed."""
    algo, _, digest = spec.rpartition(":")
    algo = algo.lower() or "sha256"
    if algo not in ("md5", "sha256") or not digest or any(c not in "0123456789abcdefABCDEF" for c in digest):
        raise MocohubError(f"bad hash {spec!r}: expected 'md5:<hex>' or 'sha256:<hex>' (a prefix is enough)")
    return algo, digest.lower()


def _fetch(url: str, dest, name: str, progress: bool) -> tuple[dict[str, Any], list[str]]:
    """Stream ``url`` into the open file ``dest``: (size and hex digests, transfer problems)."""
    digests = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    received, problems = 0, []
    try:
        with urllib.request.urlopen(url) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    dest.write(chunk)
                    received += len(chunk)
                    for h in digests.values():
                        h.update(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            problems.append(f"truncated: got {received} of {total} bytes")
    except http.client.IncompleteRead as e:  # a chunked transfer that stopped before its end
        problems.append(f"truncated: the connection closed after {received + len(e.partial)} bytes")
    except urllib.error.HTTPError as e:  # the server answered: the URL is wrong, not the network
        raise MocohubError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise MocohubError(f"could not download {url} ({getattr(reason, 'strerror', None) or reason}); "
                           f"downloads are cached in {checkpoint_dir()} ($TORCH_HOME/hub/checkpoints): point "
                           "$TORCH_HOME at a cache that holds it, or load a local checkpoint file or folder "
                           "instead (from_pretrained('path/to/file.pth.tar'))") from e
    return {"size": received, **{algo: h.hexdigest() for algo, h in digests.items()}}, problems


def _mismatches(found: Mapping[str, Any], expected_hash: str | None, expected_size: int | None) -> list[str]:
    problems = []
    if expected_size is not None and found["size"] != expected_size:
        problems.append(f"size {found['size']} bytes, expected {expected_size}")
    if expected_hash:
        algo, want = parse_hash(expected_hash)
        if not found[algo].startswith(want):
            problems.append(f"{algo} mismatch: expected {algo} {want}, got {algo} {found[algo]}")
    return problems


def _record_file(target: Path) -> Path:
    return target.with_name(f"{target.name}.json")


def _converted_dir(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.name}.mocohub")


def _cached_record(target: Path, url: str) -> dict[str, Any] | None:
    """The record of a verified cache entry, or None where the file is missing or not the one recorded."""
    try:
        record = json.loads(_record_file(target).read_text())
        stat = target.stat()
    except (OSError, ValueError):
        return None
    same = record.get("url") == url and (record.get("size"), record.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
    return record if same else None


def download(url: str, *, expected_hash: str | None = None, expected_size: int | None = None,
             progress: bool = True) -> Path:
    """The cached copy of ``url``, downloaded again unless a verified copy meets every expectation.

    ``expected_hash`` is ``"md5:<hex>"`` or ``"sha256:<hex>"`` (a prefix); ``expected_size`` is in bytes.
    """
    target = cache_file(url)
    if expected_hash:
        parse_hash(expected_hash)  # a malformed hash fails before any download
    record = _cached_record(target, url)
    if record is not None and not _mismatches(record, expected_hash, expected_size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    replacing = target.exists()

    def fetch_verified(tmp: str) -> None:
        with open(tmp, "wb") as dest:
            found, problems = _fetch(url, dest, target.name, progress)
        problems += _mismatches(found, expected_hash, expected_size)
        if not problems:
            try:
                read_checkpoint(tmp)  # a file cut short without any sign in the transfer does not load
            except MocohubError as e:
                problems.append(f"the file does not load: {e}")
        if problems:
            raise MocohubError(f"download of {url} refused ({'; '.join(problems)}); "
                               "the file was deleted, not cached")
        found.update(url=url, mtime_ns=os.stat(tmp).st_mtime_ns)
        atomic_write(_record_file(target), lambda p: Path(p).write_text(json.dumps(found, indent=1) + "\n"))

    atomic_write(target, fetch_verified)  # a refused or interrupted download leaves no file behind
    if replacing:  # the replaced file's conversion is stale
        shutil.rmtree(_converted_dir(target), ignore_errors=True)
    return target


def cached_backbone(checkpoint: Path, meta: Mapping[str, Any] | None = None) -> Backbone:
    """Convert a downloaded checkpoint once; later loads read ``<file>.mocohub/`` and unpickle nothing."""
    folder = _converted_dir(checkpoint)
    if (folder / CONFIG_NAME).is_file():
        state_dict, config = read_pretrained_dir(folder)
        return Backbone(state_dict, config, "mocohub-export")
    backbone = convert(read_checkpoint(checkpoint), meta=meta)
    staging = Path(tempfile.mkdtemp(dir=checkpoint.parent, prefix=f".{folder.name}."))
    try:
        write_pretrained(staging, backbone.state_dict, backbone.config)
    except BaseException:  # e.g. a full disk: no half-converted folder is left in the cache
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.rename(staging, folder)  # atomic: readers see the whole folder or none of it
    except OSError:  # another process renamed an equivalent folder first
        shutil.rmtree(staging, ignore_errors=True)
    return backbone
