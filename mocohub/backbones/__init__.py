"""Backbone constructors."""
from ..lazy import lazy_exports

__all__ = ["RESNET_ARCHS", "RESNET_VARIANTS", "STEMS", "apply_cifar_stem", "create_resnet", "resnet_architecture",
           "MOCO_V3_VITS", "create_vit", "vit_architecture", "vit_args"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".names": ("RESNET_ARCHS", "RESNET_VARIANTS", "STEMS", "MOCO_V3_VITS", "resnet_architecture", "vit_architecture"),
    ".resnet": ("apply_cifar_stem", "create_resnet"),
    ".vit": ("create_vit", "vit_args"),
})
