"""``mocohub extract``: embeddings of every image of a folder to one safetensors file, resumable.

Work is done in shards of ``shard_size`` images, each written atomically under
``OUT.partial/``; an interrupted run resumes at the first missing shard, and OUT itself
appears only when every shard is done.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..data.folder import collate_images
from ..data.sources import open_images
from ..errors import MocohubError
from ..fileio import DiskFullError, atomic_write, disk_full_error
from ..zoo.transforms import transform_for
from .embeddings import iter_embeddings

__all__ = ["FORMAT", "Extracted", "extract_embeddings", "load_embeddings"]

FORMAT = "mocohub-embeddings/1"
STATE_NAME = "state.json"


class Extracted(NamedTuple):
    """An extraction read back: row i of ``features`` is the image ``root / paths[i]``."""

    features: torch.Tensor  # [N, D] float32
    labels: torch.Tensor  # [N] long, -1 without class folders
    paths: list[str]  # relative to root
    classes: list[str]
    failed: list[str]  # files skipped because they could not be decoded
    metadata: dict[str, Any]


def _partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _prepare(out: Path, state: dict[str, Any], *, overwrite: bool, resume: bool) -> Path:
    """Check what exists at OUT and OUT.partial against the flags; return the partial folder."""
    partial = _partial_dir(out)
    if overwrite:
        shutil.rmtree(partial, ignore_errors=True)
    elif out.exists():
        raise MocohubError(f"{out} exists: pass --overwrite to replace it")
    elif partial.exists() and not resume:
        raise MocohubError(f"an interrupted extraction to {out} exists ({partial}): "
                           "pass --resume to continue it or --overwrite to start over")
    if (partial / STATE_NAME).is_file():
        previous = json.loads((partial / STATE_NAME).read_text())
        changed = [k for k in state if previous.get(k) != state[k]]
        if changed:
            raise MocohubError(f"cannot resume {partial}: {', '.join(changed)} changed since the interrupted "
                               "run; pass --overwrite to start over")
        return partial
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write(partial / STATE_NAME, lambda p: Path(p).write_text(json.dumps(state, indent=1)))
    return partial


def _write_shard(path: Path, parts: list, failed: list[str]) -> None:
    kept = [p for p in parts if p.features is not None]
    tensors = {
        "features": torch.cat([p.features for p in kept]) if kept else torch.zeros(0, 0),
        "labels": torch.cat([p.labels for p in kept]) if kept else torch.zeros(0, dtype=torch.long),
        "indices": torch.cat([p.indices for p in kept]) if kept else torch.zeros(0, dtype=torch.long),
    }
    atomic_write(path, lambda p: save_file(tensors, p, metadata={"failed": json.dumps(failed)}))


def extract_embeddings(model: nn.Module, image_dir: str | os.PathLike | Sequence[str], out: str | os.PathLike, *,
                       transform: Callable | None = None, batch_size: int = 64, workers: int = 0,
                       device: torch.device | str | None = None, precision: str = "auto",
                       channels_last: bool | str | None = None, normalize: bool = True, shard_size: int = 4096,
                       overwrite: bool = False, resume: bool = False, progress: bool = False,
                       model_name: str | None = None) -> Path:
    """Embed every image under ``image_dir`` (a folder, or WebDataset shards: a ``.tar`` file, a brace
    pattern or a list of shard files) and write ``out`` (safetensors).

    Tensors: ``embeddings`` [N, D] float32 (L2-normalised unless ``normalize=False``),
    ``labels`` [N]. Metadata (JSON strings): ``paths`` (relative to ``root``), ``classes``,
    ``failed`` (undecodable files, skipped), ``root``, ``model``. ``transform`` defaults to the
    model's eval transform. An existing ``out`` is refused unless ``overwrite``; ``resume``
    continues an interrupted run of the same folder, model name and settings.
    """
    out = Path(out)
    if out.exists() and resume and not overwrite:
        return out  # a finished run: nothing left to do
    data = open_images(image_dir, transform or transform_for(model), on_error="skip")
    root = data.root.resolve()
    paths = [Path(p).relative_to(data.root).as_posix() for p, _ in data.samples]
    state = {"format": FORMAT, "root": str(root), "model": model_name, "normalize": normalize,
             "shard_size": shard_size, "num_images": len(paths),
             "files_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest()}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _prepare(out, state, overwrite=overwrite, resume=resume)
    shards = [partial / f"shard-{i:06d}.safetensors" for i in range(-(-len(paths) // shard_size))]
    done = sum(min(shard_size, len(paths) - i * shard_size) for i, s in enumerate(shards) if s.exists())
    bar = tqdm(total=len(paths), initial=done, disable=not progress, desc="extract", unit="img")
    try:
        for i, shard in enumerate(shards):
            if shard.exists():
                continue
            subset = Subset(data, range(i * shard_size, min((i + 1) * shard_size, len(paths))))
            loader = DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=collate_images)
            parts, failed = [], []
            for part in iter_embeddings(model, loader, device=device, precision=precision,
                                        channels_last=channels_last, normalize=normalize):
                parts.append(part)
                failed.extend(Path(p).relative_to(data.root).as_posix() for p in part.failed)
                bar.update(len(part.indices) + len(part.failed))
            _write_shard(shard, parts, failed)
        bar.close()
        _assemble(shards, out, paths, data.classes, state)
    except DiskFullError as e:  # the finished shards stay, and only --resume continues from them
        raise disk_full_error(e.path, f"the finished shards are kept in {partial}",
                              rerun="the same command with --resume") from e
    shutil.rmtree(partial)
    return out


def _assemble(shards: list[Path], out: Path, paths: list[str], classes: list[str],
              state: dict[str, Any]) -> None:
    feats, labels, indices, failed = [], [], [], []
    for shard in shards:
        with safe_open(shard, "pt") as f:
            failed.extend(json.loads(f.metadata()["failed"]))
            if f.get_slice("indices").get_shape()[0]:
                feats.append(f.get_tensor("features"))
                labels.append(f.get_tensor("labels"))
                indices.append(f.get_tensor("indices"))
    if not feats:
        raise MocohubError(f"none of the {len(paths)} images could be decoded, e.g. {failed[0]}")
    index = torch.cat(indices).tolist()
    metadata = {"format": FORMAT, "root": state["root"], "model": json.dumps(state["model"]),
                "normalized": json.dumps(state["normalize"]), "paths": json.dumps([paths[i] for i in index]),
                "classes": json.dumps(classes),
                "failed": json.dumps(failed)}
    tensors = {"embeddings": torch.cat(feats), "labels": torch.cat(labels)}
    atomic_write(out, lambda p: save_file(tensors, p, metadata=metadata))


def load_embeddings(path: str | os.PathLike) -> Extracted:
    """Read a file written by ``extract_embeddings``."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise MocohubError(f"{path} is not a mocohub embeddings file (format {meta.get('format')!r})")
            features, labels = f.get_tensor("embeddings"), f.get_tensor("labels")
    except (OSError, SafetensorError) as e:  # missing file, not safetensors
        raise MocohubError(f"cannot read embeddings from {path}: {e}") from e
    decoded = {k: json.loads(meta[k]) for k in ("paths", "classes", "failed", "model", "normalized")}
    return Extracted(features, labels, decoded["paths"], decoded["classes"], decoded["failed"],
                     {"root": meta["root"], "model": decoded["model"], "normalized": decoded["normalized"]})
