"""Backbone constructors."""
from ..lazy import lazy_exports

__all__ = ["RESNET_ARCHS", "STEMS", "apply_cifar_stem", "create_resnet", "MOCO_V3_VITS", "create_vit",
           "vit_architecture", "vit_args"]

__getattr__, __dir__ = lazy_exports(__name__, {
    ".names": ("RESNET_ARCHS", "STEMS", "MOCO_V3_VITS", "vit_architecture"),
    ".resnet": ("apply_cifar_stem", "create_resnet"),
    ".vit": ("create_vit", "vit_args"),
})
