"""One entry for every command that reads images: a folder, or WebDataset shards."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from ..errors import MocohubError
from .folder import ImageFolder
from .shards import MANIFEST_SUFFIX, ShardImages, is_shard_source

__all__ = ["open_images"]


def open_images(source: str | os.PathLike | Sequence[str], transform: Callable | None = None, **kw) -> ImageFolder:
    """``ImageFolder`` for a folder, ``ShardImages`` for shards (a ``.tar`` file, a brace pattern
    such as ``'/data/train-{000000..000127}.tar'``, or a list of shard files); ``kw`` as for both
    (``on_error``, ``seed``, ``cache_images``, ``cache_budget``, ``cache_barrier``, ``extensions``)."""
    if is_shard_source(source):
        return ShardImages(source, transform, **kw)
    try:
        return ImageFolder(source, transform, **kw)
    except MocohubError:
        folder = Path(source)
        if not folder.is_dir() or not any(folder.glob("*.tar")):
            raise
        written = [json.loads(m.read_text()).get("pattern") for m in sorted(folder.glob(f"*{MANIFEST_SUFFIX}"))]
        example = " or ".join(f"'{p}'" for p in written if p) or f"'{folder}/NAME-{{000000..000127}}.tar'"
        raise MocohubError(f"{folder} holds .tar shards, not images: pass the shards' pattern, {example}") from None
