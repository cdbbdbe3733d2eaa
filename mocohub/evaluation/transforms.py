"""Linear-evaluation preprocessing sized from the model's pretrained_cfg, so 32-px models work."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch.nn as nn
from timm.data import resolve_data_config
from torchvision import transforms as T

__all__ = ["linear_cfg", "train_transform"]


def linear_cfg(model: nn.Module, *, input_size: int | None = None,
               crop_pct: float | None = None) -> dict[str, Any]:
    """The model's pretrained_cfg with the crop size and crop fraction optionally replaced;
    ``mocohub.transform_for(cfg)`` gives the matching val transform (Resize + CenterCrop)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if input_size is not None:
        cfg["input_size"] = [3, input_size, input_size]
    if crop_pct is not None:
        cfg["crop_pct"] = crop_pct
    return cfg


def train_transform(cfg: Mapping[str, Any]) -> Callable:
    """RandomResizedCrop + horizontal flip + normalise: the official linear-eval train transform
    (timm's training transform would add colour jitter, which the protocol does not use)."""
    data = resolve_data_config(pretrained_cfg=dict(cfg))
    return T.Compose([
        T.RandomResizedCrop(data["input_size"][-1], interpolation=T.InterpolationMode(data["interpolation"])),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(data["mean"], data["std"]),
    ])
