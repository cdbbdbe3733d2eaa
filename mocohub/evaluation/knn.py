"""Weighted kNN classification of embeddings, as the official MoCo CIFAR-10 demo and InstDisc."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from torch.utils.data import DataLoader

from ..data.folder import ImageFolder, collate_images
from ..errors import MocohubError
from ..zoo.transforms import transform_for
from .batchnorm import fit_batchnorm
from .embeddings import Embeddings, compute_embeddings, model_device, scratch_bytes, scoring_device

__all__ = ["knn_predict", "knn_chunk_rows", "topk_accuracy", "knn_classify", "knn_evaluate", "folder_knn_top1"]


def knn_chunk_rows(bank_rows: int, k: int, memory_bytes: int, element_bytes: int = 4) -> int:
    """Query rows per chunk so that one chunk's working set fits ``memory_bytes``: its similarity
    row against the whole bank, plus its top-k values, indices and votes."""
    per_row = bank_rows * element_bytes + k * (element_bytes + 8 + 8)
    return max(1, memory_bytes // per_row)


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, *, chunk_size: int | None = None) -> torch.Tensor:
    """Class scores [N, C] on ``bank``'s device: each of the k most similar bank rows votes
    exp(sim / t) for its label.

    ``query`` [N, D] and ``bank`` [M, D] are L2-normalised; queries are processed ``chunk_size``
    at a time (default: as many as fit ``scratch_bytes(bank.device)``), so the similarity matrix
    never exceeds chunk_size x M. k is clipped to M.
    """
    if bank.shape[0] == 0:
        raise MocohubError("the kNN bank is empty: the train folder gave no embeddings")
    k = min(k, bank.shape[0])
    if chunk_size is None:
        chunk_size = knn_chunk_rows(bank.shape[0], k, scratch_bytes(bank.device), bank.element_size())
    bank_labels = bank_labels.to(bank.device).long()
    scores = []
    for start in range(0, query.shape[0], chunk_size):
        sim = query[start:start + chunk_size].to(bank.device) @ bank.T
        sim_weight, sim_index = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, bank_labels[sim_index], (sim_weight / t).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, dtype=bank.dtype, device=bank.device)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Percent of rows whose label is among the top-k scores (k clipped to the class count)."""
    ranked = scores.argsort(dim=1, descending=True)
    hits = ranked == labels.view(-1, 1).to(ranked.device)
    return [100.0 * hits[:, :min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks]


def knn_classify(train: Embeddings, val: Embeddings, num_classes: int, *, k: int = 200, t: float = 0.1,
                 device: torch.device | str | None = None) -> dict[str, Any]:
    """kNN top-1/top-5 of ``val`` against the ``train`` bank (both labelled), scored on ``device``
    (default: this process's GPU when one is visible, see ``scoring_device``)."""
    for name, emb in (("train", train), ("val", val)):
        if emb.labels.numel() and int(emb.labels.min()) < 0:
            raise MocohubError(f"the {name} images have no labels: kNN needs class sub-folders "
                               "(DIR/<class>/<image>)")
    device = scoring_device(device, train.features.nbytes)
    scores = knn_predict(val.features, train.features.to(device), train.labels, num_classes, k=k, t=t)
    top1, top5 = topk_accuracy(scores, val.labels)
    return {"top1": top1, "top5": top5, "k": min(k, len(train.labels)), "t": t,
            "num_train": len(train.labels), "num_val": len(val.labels),
            "failed": train.failed + val.failed}


def _num_classes(train_loader: Iterable, val_loader: Iterable, train: Embeddings) -> int:
    """Class count from the datasets' ``classes`` (which must agree), else the largest label."""
    train_classes = getattr(getattr(train_loader, "dataset", None), "classes", None)
    val_classes = getattr(getattr(val_loader, "dataset", None), "classes", None)
    if train_classes and val_classes and list(train_classes) != list(val_classes):
        raise MocohubError(f"train and val folders have different classes ({len(train_classes)} vs "
                           f"{len(val_classes)}, e.g. {sorted(set(train_classes) ^ set(val_classes))[:3]}): "
                           "use the same class sub-folder names")
    if train_classes:
        return len(train_classes)
    return int(train.labels.max()) + 1


def knn_evaluate(model: nn.Module, train_loader: Iterable, val_loader: Iterable, *, k: int = 200,
                 t: float = 0.1, device: torch.device | str | None = None, precision: str = "auto",
                 channels_last: bool | str | None = None, progress: bool = False) -> dict[str, Any]:
    """Embed both loaders with ``model`` and score val by weighted kNN on train (percent)."""
    opts = dict(device=device, precision=precision, channels_last=channels_last, progress=progress)
    train = compute_embeddings(model, train_loader, **opts)
    val = compute_embeddings(model, val_loader, **opts)
    return knn_classify(train, val, _num_classes(train_loader, val_loader, train), k=k, t=t,
                        device=device if device is not None else model_device(model))


def folder_knn_top1(model: nn.Module, train: str | Path, val: str | Path, *, fit_bn: bool = False) -> float:
    """``knn_evaluate``'s top-1 on two labelled image folders, preprocessed as ``model`` expects (batches
    of 256); ``fit_bn``: first give a never-trained ``model`` the BN statistics of ``train`` (the fair
    random baseline, ``fit_batchnorm``)."""
    def loader(folder: str | Path) -> DataLoader:
        return DataLoader(ImageFolder(folder, transform_for(model), on_error="skip"), batch_size=256,
                          collate_fn=collate_images)
    if fit_bn:
        fit_batchnorm(model, (batch.images for batch in loader(train)))
    return knn_evaluate(model, loader(train), loader(val))["top1"]
