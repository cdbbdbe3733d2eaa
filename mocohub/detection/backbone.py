"""A MoCo ResNet as a torchvision detection backbone (FasterRCNN, MaskRCNN, RetinaNet...).

The MoCo paper found that its features need normalisation while fine-tuning: SyncBN in the
backbone (and heads), nothing frozen. That is the default here (``norm="sync_bn"``,
``trainable_layers=5``). SyncBatchNorm synchronises only under torch.distributed on GPUs; on one
device or on CPU it computes ordinary batch statistics, so the same model runs everywhere.
Images are normalised by the detector's transform: torchvision's default ImageNet mean/std is
the one MoCo was trained with.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch.nn as nn
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..backbones import apply_cifar_stem
from ..errors import MocohubError
from ..zoo.loading import from_pretrained

__all__ = ["NORMS", "detection_backbone"]

NORMS = ("sync_bn", "bn", "frozen_bn")
STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # trainable from the top down


def _torchvision_resnet(model: nn.Module, arch: str, norm: str) -> nn.Module:
    """A torchvision ResNet of ``arch`` holding ``model``'s weights (same key names)."""
    norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    try:
        resnet = torchvision.models.get_model(arch, weights=None, norm_layer=norm_layer)
    except ValueError as e:
        raise MocohubError(f"{arch} is not a torchvision ResNet: detection backbones need a ResNet") from e
    if model.conv1.kernel_size == (3, 3):
        apply_cifar_stem(resnet)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
        raise MocohubError(f"weights do not fit torchvision {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return resnet


def _freeze(resnet: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the top ``trainable_layers`` stages, as torchvision's resnet_fpn_backbone."""
    trainable = STAGES[:trainable_layers] + (("bn1",) if trainable_layers == 5 else ())
    for name, param in resnet.named_parameters():
        if not name.startswith(trainable):
            param.requires_grad_(False)


def detection_backbone(name_or_model: str | nn.Module, *, fpn: bool = True, trainable_layers: int = 5,
                       norm: str = "sync_bn", returned_layers: Sequence[int] = (1, 2, 3, 4),
                       fpn_channels: int = 256, arch: str | None = None) -> nn.Module:
    """A backbone with ``out_channels`` for torchvision's detectors, initialised with MoCo weights.

    ``name_or_model``: anything ``mocohub.from_pretrained`` takes, or a ResNet module (then
    ``arch`` defaults to its mocohub config). ``fpn=True`` gives an FPN over ``returned_layers``
    (dict of 256-channel maps); ``fpn=False`` the C5 map (stride 32, 2048 channels for R50).
    """
    if norm not in NORMS:
        raise MocohubError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if not 0 <= trainable_layers <= 5:
        raise MocohubError(f"trainable_layers must be 0..5 (stages from the top), not {trainable_layers}")
    model = from_pretrained(name_or_model) if isinstance(name_or_model, str) else name_or_model
    arch = arch or getattr(model, "mocohub_config", {}).get("architecture")
    if arch is None:
        raise MocohubError("cannot tell the architecture of this module: pass arch='resnet50' (or the like)")
    resnet = _torchvision_resnet(model, arch, norm)
    _freeze(resnet, trainable_layers)
    if norm == "sync_bn":
        resnet = nn.SyncBatchNorm.convert_sync_batchnorm(resnet)
    if fpn:
        if not returned_layers or not set(returned_layers) <= {1, 2, 3, 4}:
            raise MocohubError(f"returned_layers must be a subset of 1..4, not {tuple(returned_layers)}")
        stage2 = resnet.inplanes // 8
        return BackboneWithFPN(resnet, {f"layer{k}": str(i) for i, k in enumerate(returned_layers)},
                               [stage2 * 2 ** (k - 1) for k in returned_layers], fpn_channels,
                               extra_blocks=LastLevelMaxPool())
    body = nn.Sequential(OrderedDict((n, m) for n, m in resnet.named_children() if n not in ("avgpool", "fc")))
    body.out_channels = resnet.inplanes
    return body
