"""Linear-evaluation preprocessing sized from the model's pretrained_cfg, so 32-px models work."""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T

__all__ = ["data_config", "eval_transform", "train_transform"]


def data_config(model: nn.Module, *, input_size: int | None = None,
                crop_pct: float | None = None) -> dict[str, Any]:
    """timm's data config of ``model`` (mean, std, input_size, crop_pct, interpolation), with overrides."""
    overrides: dict[str, Any] = {}
    if input_size is not None:
        overrides["input_size"] = (3, input_size, input_size)
    if crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    return resolve_data_config(overrides, model=model)


def eval_transform(config: dict[str, Any]) -> Callable:
    """Resize(size / crop_pct) + CenterCrop(size) + normalise: the official val transform."""
    return create_transform(**config, is_training=False)


def train_transform(config: dict[str, Any]) -> Callable:
    """RandomResizedCrop + horizontal flip + normalise: the official linear-eval train transform
    (timm's training transform would add colour jitter, which the protocol does not use)."""
    size = config["input_size"][-1]
    interpolation = T.InterpolationMode(config.get("interpolation", "bilinear"))
    return T.Compose([
        T.RandomResizedCrop(size, interpolation=interpolation),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(config["mean"], config["std"]),
    ])
