"""Pooled embeddings of every image a loader yields: the input of kNN, the fast probe and extract."""
from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import MocohubError
from ..precision import autocast, resolve_channels_last, resolve_precision

__all__ = ["Embeddings", "model_device", "scoring_device", "scratch_bytes", "embed_batch", "iter_embeddings",
           "compute_embeddings", "concat_embeddings"]

CPU_SCRATCH_BYTES = 256 << 20  # a kNN chunk's similarity rows on the CPU (was 1024 x bank: 5 GB at ImageNet size)
MAX_GPU_SCRATCH_BYTES = 1 << 30  # larger chunks are no faster: the matmul is already saturated

class Embeddings(NamedTuple):
    """Float32 features on the CPU (L2-normalised by default), in loader order, with what
    identifies them."""

    features: torch.Tensor | None  # [N, D]; None for a batch whose images all failed
    labels: torch.Tensor  # [N] long, -1 for unlabelled folders
    indices: torch.Tensor  # [N] long, positions in the dataset
    failed: list[str]  # files that could not be decoded (skipped, not fatal)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def scoring_device(device: torch.device | str | None = None, need_bytes: int = 0) -> torch.device:
    """Where cached embeddings are scored (kNN, the L-BFGS probe): ``device``, by default this
    process's GPU when one is visible; the CPU when that GPU lacks twice ``need_bytes`` free (the
    data plus room for its chunks), rather than failing out of memory."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and 2 * need_bytes > torch.cuda.mem_get_info(device)[0]:
        return torch.device("cpu")
    return device


def scratch_bytes(device: torch.device | str) -> int:
    """Working memory a chunked scoring loop may take on ``device``: a quarter of a GPU's free memory
    (at most 1 GiB), a fixed 256 MiB on the CPU. The best GPU chunk only a GPU can tell."""
    device = torch.device(device)
    if device.type == "cuda":
        return min(torch.cuda.mem_get_info(device)[0] // 4, MAX_GPU_SCRATCH_BYTES)
    return CPU_SCRATCH_BYTES


def embed_batch(model: nn.Module, images: torch.Tensor, *, device: torch.device, precision: str = "auto",
                channels_last: bool = False, normalize: bool = True) -> torch.Tensor:
    """Float32 CPU features of one batch (L2-normalised unless ``normalize=False``, which a
    linear head needs); the caller sets eval mode and no_grad."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        out = model(images)
    if out.ndim != 2:
        raise MocohubError(f"the model returned features of shape {tuple(out.shape)}, not (N, D): "
                           "use a pooled backbone (num_classes=0, features_only=False)")
    out = out.float()
    return (F.normalize(out, dim=1) if normalize else out).cpu()


def iter_embeddings(model: nn.Module, loader: Iterable, *, device: torch.device | str | None = None,
                    precision: str = "auto", channels_last: bool | str | None = None,
                    normalize: bool = True) -> Iterator[Embeddings]:
    """Yield the embeddings of each batch (features None when every image of it failed).

    ``device`` defaults to the model's; the model is moved there when it differs and is put
    in eval mode while the generator runs (BN running statistics, no dropout), then restored.
    ``precision="auto"`` is bf16 where ``device`` computes it natively, else fp32; ``channels_last``
    None follows the precision (NHWC with bf16/fp16).
    """
    device = torch.device(device) if device is not None else model_device(model)
    precision = resolve_precision(precision, device)[0]
    channels_last = resolve_channels_last(channels_last, precision)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if batch.images is None:
                yield Embeddings(None, batch.labels, batch.indices, batch.failed)
                continue
            with torch.inference_mode():
                feats = embed_batch(model, batch.images, device=device, precision=precision,
                                    channels_last=channels_last, normalize=normalize)
            yield Embeddings(feats, batch.labels.long(), batch.indices.long(), batch.failed)
    finally:
        model.train(was_training)


def compute_embeddings(model: nn.Module, loader: Iterable, *, device: torch.device | str | None = None,
                       precision: str = "auto", channels_last: bool | str | None = None,
                       progress: bool = False, normalize: bool = True) -> Embeddings:
    """Embed every batch of ``loader`` (``mocohub.data.folder.Batch`` items) into one Embeddings."""
    total = len(loader) if hasattr(loader, "__len__") else None
    batches = tqdm(loader, total=total, disable=not progress, desc="embed", unit="batch")
    parts = list(iter_embeddings(model, batches, device=device, precision=precision,
                                 channels_last=channels_last, normalize=normalize))
    failed = [path for part in parts for path in part.failed]
    parts = [part for part in parts if part.features is not None]
    if not parts:
        raise MocohubError(f"no image could be decoded ({len(failed)} failed, e.g. "
                           f"{failed[0] if failed else 'none'}): check the image folder")
    return concat_embeddings(parts)._replace(failed=failed)


def concat_embeddings(parts: list[Embeddings]) -> Embeddings:
    """One Embeddings from several (e.g. batches, or augmented copies of a train set)."""
    return Embeddings(*(torch.cat(t) for t in zip(*(p[:3] for p in parts))), [f for p in parts for f in p.failed])
