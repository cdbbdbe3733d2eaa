"""The backbones mocohub builds, by name (ResNet architectures and stems, MoCo v3's ViTs as timm names):
what a parser lists or a check reads, without timm or torch."""
from __future__ import annotations

from typing import Any

__all__ = ["RESNET_ARCHS", "RESNET_VARIANTS", "STEMS", "MOCO_V3_VITS", "resnet_architecture", "vit_architecture"]

# mocohub's ResNet names that timm builds from another name with model_args (what an export's config.json
# writes, so timm rebuilds them too): resnet10t at half width, between test_resnet and resnet10t in cost,
# for the CPU recipe (its hour on CIFAR-10: benchmarks/README.md).
RESNET_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet10t_half": ("resnet10t", {"channels": [32, 64, 128, 256], "stem_width": 16}),
}
RESNET_ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
    # timm's small ResNets (a "deep" 3-conv stem, one block per stage): for CPU demos and studies
    "resnet10t", "test_resnet", *RESNET_VARIANTS,
)
STEMS = ("imagenet", "cifar")

# MoCo v3's ViT names -> (timm architecture, model_args). Its ViT-S has 12 heads where timm's has 6.
MOCO_V3_VITS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_small": ("vit_small_patch16_224", {"num_heads": 12}),
    "vit_base": ("vit_base_patch16_224", {}),
}


def resnet_architecture(arch: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """The timm architecture and ``model_args`` that rebuild ``arch`` (a mocohub or timm ResNet name)."""
    timm_arch, model_args = RESNET_VARIANTS.get(arch, (arch, {}))
    return timm_arch, {**model_args, **kwargs}


def vit_architecture(arch: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """The timm architecture and ``model_args`` that rebuild ``arch`` (a MoCo v3 or timm ViT name)."""
    timm_arch, model_args = MOCO_V3_VITS.get(arch, (arch, {}))
    return timm_arch, {**model_args, **kwargs}
