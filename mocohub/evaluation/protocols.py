"""The evaluation protocols of a frozen backbone side by side: weighted kNN, the fast linear probe
and the official linear protocols, on the same images.

Their numbers disagree (one checkpoint: 67.5 by one protocol, 66.4 by another), so one table names
each protocol with its settings. kNN and the fast probe score features computed once (raw
features; kNN L2-normalises them, as ``mocohub knn`` does per batch); the official protocols train
an fc on augmented images, so they embed every epoch.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.folder import collate_images
from ..data.sources import open_images
from ..errors import MocohubError
from ..zoo.transforms import transform_for
from .embeddings import Embeddings, compute_embeddings, model_device
from .knn import knn_classify
from .linear import DEFAULT_WEIGHT_DECAYS, LinearProtocol, fast_linear_probe, resolve_protocol, train_linear_head
from .transforms import linear_cfg, train_transform

__all__ = ["PROTOCOL_NAMES", "SHARED_FEATURES", "image_loader", "shared_classes", "official_protocol",
           "evaluate_protocols"]

PROTOCOL_NAMES = ("knn", "fast", "v1", "v3")  # v1, v3: the official linear protocols (v3 on a ViT: v3-vit)
SHARED_FEATURES = ("knn", "fast")  # scored on one pass of eval-transform features

Source = Union[str, os.PathLike, Sequence[str]]  # a folder or shards, as open_images takes


def image_loader(data: Dataset, *, batch_size: int = 256, workers: int = 0, device: torch.device | None = None,
                 shuffle: bool = False) -> DataLoader:
    """Batches of a dataset opened by ``open_images`` (undecodable images reported, not fatal)."""
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      collate_fn=collate_images, pin_memory=device is not None and device.type == "cuda")


def shared_classes(train: Dataset, val: Dataset) -> list[str]:
    """The class names both labelled sets share; an unlabelled set or different classes are refused."""
    for flag, data in (("--train", train), ("--val", val)):
        if not data.classes:
            raise MocohubError(f"{flag} {data.root} has no class sub-folders: labels come from DIR/<class>/<image>")
    if train.classes != val.classes:
        raise MocohubError(f"train and val folders have different classes ({len(train.classes)} vs "
                           f"{len(val.classes)}): use the same class sub-folder names")
    return train.classes


def official_protocol(name: str, model: nn.Module, num_train: int, *, batch_size: int | None = None,
                      **overrides: Any) -> tuple[str, LinearProtocol, bool]:
    """The official linear protocol ``name`` for ``model`` on ``num_train`` images: v3 on a ViT is
    v3-vit (base lr 3); without a given ``batch_size``, a protocol batch larger than the train set
    becomes one batch of all images (True: the caller says so), its lr following where it scales."""
    if name == "v3" and hasattr(model, "patch_embed"):  # MoCo v3's ViT linear protocol: base lr 3
        name = "v3-vit"
    protocol = resolve_protocol(name, batch_size=batch_size, **overrides)
    clipped = batch_size is None and num_train < protocol.batch_size
    if clipped:  # one step of all images per epoch
        protocol = resolve_protocol(name, batch_size=num_train, **overrides)
    return name, protocol, clipped


def _unit(emb: Embeddings) -> Embeddings:
    """L2-normalised features, as ``compute_embeddings`` gives by default: the kNN's cosine similarity."""
    return emb._replace(features=F.normalize(emb.features, dim=1))


def _row(protocol: str, metrics: dict[str, Any], seconds: float, **settings: Any) -> dict[str, Any]:
    return {"protocol": protocol, "top1": metrics["top1"], "top5": metrics["top5"], "seconds": seconds,
            "settings": settings}


def evaluate_protocols(model: nn.Module, train: Source, val: Source, protocols: Sequence[str] = SHARED_FEATURES, *,
                       k: int = 200, t: float = 0.1, weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
                       epochs: int | None = None, batch_size: int = 256, workers: int = 0,
                       device: torch.device | str | None = None, precision: str = "auto",
                       channels_last: bool | str | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """One row per protocol, in the order given: ``{"protocol", "top1", "top5", "seconds", "settings"}``.

    ``train``/``val``: labelled folders or shards with the same classes. kNN (``k``, ``t``) and the
    fast probe (``weight_decays``, chosen on a 20 % hold-out of train) share one feature pass, whose
    time ``settings["features_s"]`` gives and their ``seconds`` leave out; ``v1``/``v3`` train an fc
    by the official protocol (``epochs`` overrides its length), embedding ``batch_size`` images per
    step for val. ``device`` defaults to the model's.
    """
    unknown = [p for p in protocols if p not in PROTOCOL_NAMES]
    if unknown or not protocols:
        raise MocohubError(f"unknown evaluation protocol {unknown[0] if unknown else 'list (empty)'}; "
                           f"choose from {', '.join(PROTOCOL_NAMES)}")
    device = torch.device(device) if device is not None else model_device(model)
    cfg = linear_cfg(model)
    val_data = open_images(val, transform_for(cfg), on_error="skip")
    val_loader = image_loader(val_data, batch_size=batch_size, workers=workers, device=device)
    rows: dict[str, dict[str, Any]] = {}
    if any(p in SHARED_FEATURES for p in protocols):
        train_data = open_images(train, transform_for(cfg), on_error="skip")
        num_classes = len(shared_classes(train_data, val_data))
        start = time.perf_counter()
        opts = dict(device=device, precision=precision, channels_last=channels_last, progress=progress,
                    normalize=False)
        train_emb = compute_embeddings(model, image_loader(train_data, batch_size=batch_size, workers=workers,
                                                           device=device), **opts)
        val_emb = compute_embeddings(model, val_loader, **opts)
        shared = {"num_train": len(train_emb.labels), "num_val": len(val_emb.labels),
                  "skipped": len(train_emb.failed) + len(val_emb.failed),
                  "features_s": time.perf_counter() - start}
        if "knn" in protocols:
            start = time.perf_counter()
            metrics = knn_classify(_unit(train_emb), _unit(val_emb), num_classes, k=k, t=t, device=device)
            rows["knn"] = _row("knn", metrics, time.perf_counter() - start, k=metrics["k"], t=t, **shared)
        if "fast" in protocols:
            start = time.perf_counter()
            _, metrics = fast_linear_probe(train_emb, val_emb, num_classes, weight_decays=weight_decays,
                                           device=device)
            rows["fast"] = _row("fast", metrics, time.perf_counter() - start, weight_decay=metrics["weight_decay"],
                                weight_decays=list(weight_decays), **shared)
    for name in (p for p in protocols if p not in SHARED_FEATURES):
        start = time.perf_counter()
        train_data = open_images(train, train_transform(cfg), on_error="skip")
        num_classes = len(shared_classes(train_data, val_data))
        resolved, protocol, _ = official_protocol(name, model, len(train_data), epochs=epochs)
        train_loader = image_loader(train_data, batch_size=protocol.batch_size, workers=workers, device=device,
                                    shuffle=True)
        _, metrics = train_linear_head(model, train_loader, val_loader, num_classes, protocol, device=device,
                                       precision=precision, channels_last=channels_last, progress=progress)
        rows[name] = _row(resolved, metrics, time.perf_counter() - start, epochs=protocol.epochs, lr=protocol.lr,
                          batch_size=protocol.batch_size, schedule=protocol.schedule,
                          milestones=list(protocol.milestones), best_top1=metrics["best_top1"],
                          num_train=len(train_data), num_val=len(val_data))
    return [rows[p] for p in protocols]
