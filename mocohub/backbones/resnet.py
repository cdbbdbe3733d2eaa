"""ResNet backbones, built by timm (whose ResNet state dicts equal torchvision's key for key)."""
from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

from .names import RESNET_ARCHS, STEMS, resnet_architecture

__all__ = ["RESNET_ARCHS", "STEMS", "create_resnet", "apply_cifar_stem"]


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Swap the 7x7/2 conv + max-pool stem for a 3x3/1 conv, as the official CIFAR-10 demo does.

    Small images (32 px) would otherwise shrink to 1x1 before layer4. A timm "deep" stem (a
    Sequential of three convs, e.g. resnet10t) is replaced the same way, keeping its output width.
    """
    width = model.bn1.num_features
    model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    info = getattr(model, "feature_info", None)
    levels = getattr(info, "info", info)  # a list on a model, a FeatureInfo on features_only
    if isinstance(levels, list):  # the stem no longer downsamples by 4
        for level in levels:
            level["reduction"] = max(1, level["reduction"] // (2 if level["module"] == "act1" else 4))
    return model


def create_resnet(
    arch: str,
    *,
    num_classes: int = 0,
    stem: str = "imagenet",
    zero_init_residual: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Create a randomly initialised ResNet with torchvision's layout.

    ``zero_init_residual`` defaults to False because MoCo v1/v2 used torchvision's default
    (timm's default zeroes the last BN of each block; MoCo v3 asks for that explicitly).
    """
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid ResNet archs: {', '.join(RESNET_ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
    timm_arch, model_args = resnet_architecture(arch, **kwargs)
    model = timm.create_model(timm_arch, pretrained=False, num_classes=num_classes,
                              zero_init_last=zero_init_residual, **model_args)
    if stem == "cifar":
        apply_cifar_stem(model)
    return model
