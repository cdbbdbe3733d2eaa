"""Linear probes of a frozen backbone: the official protocol (SGD on images) and a fast one
(L-BFGS on features computed once)."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import MocohubError
from ..precision import autocast, resolve_channels_last, resolve_precision
from .embeddings import Embeddings, model_device, scoring_device
from .knn import topk_accuracy
from .protocol_settings import DEFAULT_WEIGHT_DECAYS, PROTOCOLS, LinearProtocol

__all__ = [
    "LinearProtocol", "PROTOCOLS", "resolve_protocol", "new_linear_head", "lr_at_epoch",
    "train_linear_head", "evaluate_head", "fit_linear_head", "probe_bytes", "fast_linear_probe",
    "DEFAULT_WEIGHT_DECAYS",
]


def resolve_protocol(name: str = "v1", **overrides: Any) -> LinearProtocol:
    """A protocol with some settings replaced (None means keep); with a ``base_lr`` (v3) the lr
    follows the batch size unless ``lr`` is given."""
    if name not in PROTOCOLS:
        raise MocohubError(f"unknown linear protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    protocol = dataclasses.replace(PROTOCOLS[name], **overrides)
    if protocol.base_lr is not None and "lr" not in overrides:
        protocol = dataclasses.replace(protocol, lr=protocol.base_lr * protocol.batch_size / 256)
    if protocol.schedule not in ("step", "cosine"):
        raise MocohubError(f"unknown schedule {protocol.schedule!r}; choose step or cosine")
    return protocol


def lr_at_epoch(protocol: LinearProtocol, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based), as the official adjust_learning_rate."""
    if protocol.schedule == "cosine":
        return protocol.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / protocol.epochs))
    return protocol.lr * 0.1 ** sum(epoch >= m for m in protocol.milestones)


def new_linear_head(num_features: int, num_classes: int) -> nn.Linear:
    """fc initialised as the official protocol: weights N(0, 0.01), bias 0."""
    head = nn.Linear(num_features, num_classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def _features(backbone: nn.Module, images: torch.Tensor, device: torch.device, precision: str,
              channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(device, precision):
        return backbone(images).float()


def evaluate_head(backbone: nn.Module, head: nn.Module, loader: Iterable, *, device: torch.device,
                  precision: str = "auto", channels_last: bool | str | None = None) -> dict[str, float]:
    """Top-1/top-5 (percent) of ``head(backbone(x))`` over a labelled loader."""
    precision = resolve_precision(precision, device)[0]
    channels_last = resolve_channels_last(channels_last, precision)
    was_training = head.training
    head.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in loader:
            if batch.images is not None:
                scores.append(head(_features(backbone, batch.images, device, precision, channels_last)).cpu())
                labels.append(batch.labels)
    head.train(was_training)
    top1, top5 = topk_accuracy(torch.cat(scores), torch.cat(labels))
    return {"top1": top1, "top5": top5}


def train_linear_head(backbone: nn.Module, train_loader: Iterable, val_loader: Iterable, num_classes: int,
                      protocol: LinearProtocol, *, device: torch.device | str | None = None,
                      precision: str = "auto", channels_last: bool | str | None = None, progress: bool = False,
                      on_epoch: Callable[[dict[str, Any]], None] | None = None) -> tuple[nn.Linear, dict[str, Any]]:
    """Train only a new fc on a frozen backbone kept in eval mode (BN statistics untouched).

    ``train_loader`` should yield ``protocol.batch_size`` augmented images per batch; val is
    scored after every epoch and ``on_epoch`` receives each epoch's metrics. ``precision="auto"``
    is bf16 where ``device`` computes it natively, else fp32; ``channels_last`` None follows it.
    """
    device = torch.device(device) if device is not None else model_device(backbone)
    precision = resolve_precision(precision, device)[0]
    channels_last = resolve_channels_last(channels_last, precision)
    backbone.to(device).eval()
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    head = new_linear_head(backbone.num_features, num_classes).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=protocol.lr, momentum=protocol.momentum,
                                weight_decay=protocol.weight_decay)
    best, start, metrics = 0.0, time.perf_counter(), {}
    for epoch in range(protocol.epochs):
        lr = lr_at_epoch(protocol, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        head.train()
        total, seen = 0.0, 0
        bar = tqdm(train_loader, disable=not progress, desc=f"lincls {epoch + 1}/{protocol.epochs}", unit="batch")
        for batch in bar:
            if batch.images is None:
                continue
            feats = _features(backbone, batch.images, device, precision, channels_last)
            loss = F.cross_entropy(head(feats), batch.labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(feats)
            seen += len(feats)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.4g}")
        val = evaluate_head(backbone, head, val_loader, device=device, precision=precision,
                            channels_last=channels_last)
        best = max(best, val["top1"])
        metrics = {"epoch": epoch + 1, "lr": lr, "loss": total / max(seen, 1), **val, "best_top1": best,
                   "time_s": time.perf_counter() - start}
        if on_epoch is not None:
            on_epoch(metrics)
    return head.cpu(), metrics


def probe_bytes(rows: int, dim: int, num_classes: int) -> int:
    """Memory of a full-batch probe: raw and standardised features, logits with their softmax and gradient."""
    return 4 * rows * (2 * dim + 3 * num_classes)


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                    weight_decay: float = 1e-4, max_iter: int = 500,
                    device: torch.device | str | None = None) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS (CE + wd/2 * |W|^2), on ``device``
    (default: the GPU when one is visible and has room, see ``scoring_device``); the head is
    returned on the CPU.

    Features are standardised for a well-conditioned problem, then the scaling is folded into
    the returned layer, so it applies to raw backbone features like an fc trained by SGD.
    """
    device = scoring_device(device, probe_bytes(*features.shape, num_classes))
    x = features.to(device).float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")
    y = labels.to(device).long()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    head = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(weight / std)
        head.bias.copy_(bias - head.weight @ mean)
    return head


def fast_linear_probe(train: Embeddings, val: Embeddings, num_classes: int, *,
                      weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, holdout: float = 0.2,
                      max_iter: int = 500, seed: int = 0,
                      device: torch.device | str | None = None) -> tuple[nn.Linear, dict[str, Any]]:
    """Linear probe on cached (raw, not normalised) features; minutes instead of hours.

    With several ``weight_decays`` the best is chosen on a ``holdout`` fraction of the train
    images (split by image, so augmented copies of one image stay on one side), then the
    head is refit on all of train and scored on val. The fits run on ``device`` (see
    ``fit_linear_head``).
    """
    if train.labels.numel() == 0 or int(train.labels.min()) < 0:
        raise MocohubError("the train images have no labels: a linear probe needs class sub-folders")
    start = time.perf_counter()
    search: dict[str, float] = {}
    chosen = weight_decays[0]
    if len(weight_decays) > 1:
        images = train.indices.unique()
        generator = torch.Generator().manual_seed(seed)
        held = images[torch.randperm(len(images), generator=generator)[:max(1, int(holdout * len(images)))]]
        is_held = torch.isin(train.indices, held)
        for wd in weight_decays:
            head = fit_linear_head(train.features[~is_held], train.labels[~is_held], num_classes,
                                   weight_decay=wd, max_iter=max_iter, device=device)
            with torch.no_grad():
                search[f"{wd:g}"] = topk_accuracy(head(train.features[is_held]), train.labels[is_held], (1,))[0]
        chosen = max(weight_decays, key=lambda wd: (search[f"{wd:g}"], wd))  # ties: stronger decay
    head = fit_linear_head(train.features, train.labels, num_classes, weight_decay=chosen, max_iter=max_iter,
                           device=device)
    with torch.no_grad():
        top1, top5 = topk_accuracy(head(val.features), val.labels)
    return head, {"top1": top1, "top5": top5, "weight_decay": chosen, "holdout_top1": search,
                  "num_train": len(train.labels), "num_val": len(val.labels),
                  "fit_time_s": time.perf_counter() - start}
