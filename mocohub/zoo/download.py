"""Verified downloads into torch.hub's cache, plus a safetensors cache of the converted backbone.

A file reaches the cache only after its size and hash are checked, and always by an atomic rename
of a temporary file: two processes downloading at once both leave a sound cache, and a
truncated or tampered file is never found there later as if it were good.
"""
from __future__ import annotations

import hashlib
import http.client
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

__all__ = ["checkpoint_dir", "parse_hash", "download", "cached_backbone"]

_CHUNK = 1 << 20


def checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints``, where torch.hub keeps downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def parse_hash(spec: str) -> tuple[str, str]:
    """``"md5:<hex>"`` or ``"sha256:<hex>"`` (a bare hex string means sha256); prefixes allowed."""
    algo, _, digest = spec.rpartition(":")
    algo = algo.lower() or "sha256"
    if algo not in ("md5", "sha256") or not digest or any(c not in "0123456789abcdefABCDEF" for c in digest):
        raise MocohubError(f"bad hash {spec!r}: expected 'md5:<hex>' or 'sha256:<hex>' (a prefix is enough)")
    return algo, digest.lower()


def _fetch(url: str, dest, name: str, progress: bool) -> tuple[dict[str, str], int, int | None]:
    """Stream ``url`` into the open file ``dest``: (hex digests, bytes received, bytes announced)."""
    digests = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    received, total = 0, None
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
    except http.client.IncompleteRead:
        pass  # reported below as a truncated download
    except (urllib.error.URLError, OSError) as e:
        raise MocohubError(f"could not download {url}: {e}") from e
    return {algo: h.hexdigest() for algo, h in digests.items()}, received, total


def _verify(url: str, found: dict[str, str], received: int, total: int | None, expected: str | None) -> None:
    algo, want = parse_hash(expected) if expected else ("sha256", None)
    problems = []
    if total is not None and received != total:
        problems.append(f"truncated: got {received} of {total} bytes")
    if want is not None and not found[algo].startswith(want):
        problems.append(f"{algo} mismatch")
    if problems:
        raise MocohubError(
            f"download of {url} refused ({'; '.join(problems)}): expected {algo} {want or '(none given)'}, "
            f"got {algo} {found[algo]}; the file was deleted, not cached")


def download(url: str, *, expected_hash: str | None = None, progress: bool = True) -> Path:
    """The cached copy of ``url``, downloaded and verified against ``expected_hash`` if missing."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise MocohubError(f"cannot name a cache file after {url!r}: the URL has no file name")
    target = checkpoint_dir() / name
    if target.is_file():
        return target
    if expected_hash:
        parse_hash(expected_hash)  # a malformed hash fails before any download
    target.parent.mkdir(parents=True, exist_ok=True)

    def fetch_verified(tmp: str) -> None:
        with open(tmp, "wb") as dest:
            found, received, total = _fetch(url, dest, name, progress)
        _verify(url, found, received, total, expected_hash)

    atomic_write(target, fetch_verified)  # a refused download leaves no file behind
    return target


def cached_backbone(checkpoint: Path, meta: Mapping[str, Any] | None = None) -> Backbone:
    """Convert a downloaded checkpoint once; later loads read ``<file>.mocohub/`` and unpickle nothing."""
    folder = checkpoint.with_name(f"{checkpoint.name}.mocohub")
    if (folder / CONFIG_NAME).is_file():
        state_dict, config = read_pretrained_dir(folder)
        return Backbone(state_dict, config, "mocohub-export")
    backbone = convert(read_checkpoint(checkpoint), meta=meta)
    staging = Path(tempfile.mkdtemp(dir=checkpoint.parent, prefix=f".{folder.name}."))
    write_pretrained(staging, backbone.state_dict, backbone.config)
    try:
        os.rename(staging, folder)  # atomic: readers see the whole folder or none of it
    except OSError:  # another process renamed an equivalent folder first
        shutil.rmtree(staging, ignore_errors=True)
    return backbone
